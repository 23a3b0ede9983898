"""formats.report: the inspect report as data, and its text rendering (no quantizer needed)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from formats.header import ModelConfig, Recipe
from formats.qtensor import QuantSpec
from formats.reader import MoepackFile
from formats.report import expert_section, render_text, report_for
from formats.synthetic import write_synthetic
from formats.writer import make_expert_layout
from tests.quantize.helpers import MIXTRAL

SMALL = ModelConfig(
    vocab_size=100, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
    rope_theta=1e4, max_position_embeddings=512, tie_word_embeddings=True,
)
RECIPE = Recipe({
    "embeddings": QuantSpec(16), "attention": QuantSpec(4, 64, 8, 256), "norms": QuantSpec(16),
    "router": QuantSpec(16), "experts": QuantSpec(3, 64, 8, 128), "lm_head": QuantSpec(16),
})


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("rep") / "s.moepack", SMALL, RECIPE, seed=3)


def test_report_figures(synthetic):
    with MoepackFile(synthetic) as mf:
        rep = report_for(mf, tensors=True)
        h = mf.header
    json.dumps(rep, allow_nan=False)  # JSON-ready
    assert rep["file"]["size_bytes"] == synthetic.stat().st_size
    assert rep["file"]["data_offset"] + rep["file"]["data_bytes"] == rep["file"]["size_bytes"]
    roles = rep["roles"]
    assert roles["lm_head"]["tensors"] == 0 and roles["lm_head"]["bits_per_weight"] is None  # tied embeddings
    assert roles["embeddings"]["bits_per_weight"] == 16.0
    assert roles["attention"]["weights"] == 2 * (128 * 128 + 2 * 64 * 128 + 128 * 128)
    assert roles["experts"]["tensors"] == 2 * 4 * 3
    ex = rep["experts"]
    assert ex["record_size"] % 4096 == 0 and ex["record_alignment"] == 4096
    assert roles["experts"]["bytes"] == ex["total_bytes"] == 8 * ex["record_size"]
    assert sum(r["bytes"] for r in roles.values()) <= rep["file"]["data_bytes"]
    assert ex["payload_bytes"] == sum(m["bytes"] for m in ex["matrices"]) <= ex["record_size"]
    # no errors recorded in a synthetic file
    assert all(v is None for v in rep["errors"]["roles"].values())
    gpu = rep["gpu_memory"]
    assert gpu["non_expert_bytes"] == sum(t.nbytes for t in h.tensors)
    assert gpu["kv_cache_bytes"] == 2 * 2 * 2 * 32 * 512 * 2
    assert [c["experts_per_layer"] for c in gpu["configs"]] == [1, 2, 4]
    rows = rep["tensors"]
    assert len(rows) == len(h.tensors) + 8 * 3
    assert rows[0]["name"] == "model.embed_tokens.weight" and rows[-1]["name"] == "model.norm.weight"


def test_text_rendering(synthetic):
    with MoepackFile(synthetic) as mf:
        rep = report_for(mf, tensors=True)
    rep["verify"] = {"ok": True, "records": 3, "bytes": 12288}
    text = render_text(rep)
    assert "none recorded" in text and "tied embeddings    yes" in text
    assert "experts     3-bit g64, 8-bit meta g128" in text
    assert "* verify: all 3 records match their crc32 (12.00 KiB checked)" in text
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in text
    assert all(len(line) < 200 for line in text.splitlines())


def test_mixtral_expert_bits_per_weight():
    """2-bit g16 with 8-bit scale/zero in groups of 128 (float32 step/min per meta group) costs
    2 + 8/16 + 8/16 + 2 * 64 / (16 * 128) = 3.0625 bits/weight; 3-bit g64 3.2656; 4-bit g64 (meta 256) 4.2578."""
    for spec, bpw in ((QuantSpec(2, 16, 8, 128), 3.0625), (QuantSpec(3, 64, 8, 128), 3.265625), (QuantSpec(4, 64, 8, 256), 4.2578125)):
        lay = make_expert_layout(MIXTRAL, spec)
        ex = expert_section(SimpleNamespace(expert_layout=lay, config=MIXTRAL, experts=()))
        assert ex["weights"] == 176_160_768
        assert ex["payload_bits_per_weight"] == pytest.approx(bpw)
        assert ex["bits_per_weight"] == pytest.approx(bpw, abs=1e-4)  # record padding to 4096 is negligible
