"""`moe-pack calibrate`: routing counts from the file's own model land in its header, the
records stay byte-identical, inspect shows the counts, and bad input is one line."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from formats.errors import LayoutError
from formats.reader import MoepackFile
from formats.writer import rewrite_header
from quantize.calibrate import count_experts
from runtime.loader import load_model
from runtime.tokenizer import TextTokenizer
from tests.quantize.helpers import one_torch_thread  # noqa: F401 (autouse fixture)
from tests.quantize.helpers import assert_user_error, packed, run_cli

TEXT = ("Experts live in host memory and stream to the GPU on demand. " * 6
        + "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 4)


@pytest.fixture
def model_file(tmp_path, tmp_path_factory, tiny_checkpoint):
    src = packed(tmp_path_factory, tiny_checkpoint, "--attn-bits", "4", "--expert-bits", "2")
    dst = tmp_path / "m.moepack"
    shutil.copy(src, dst)
    return dst


def test_counts_equal_a_direct_count_of_the_routing(model_file):
    counts, n = count_experts(model_file, TEXT, ctx=16, device="cpu", progress=False)
    # reference: the same windows through the model, routing read from the router directly
    with MoepackFile(model_file) as f:
        ids = TextTokenizer(f.header.tokenizer).encode(TEXT, add_bos=False)
        model, _ = load_model(f, torch.device("cpu"), torch.float32, ctx=16, dequantize_at_load=True)
        seen = torch.zeros(f.config.num_hidden_layers, f.config.num_local_experts, dtype=torch.int64)
        inner = model.experts

        class Spy:
            def forward(self, layer, x, idx, w):
                seen[layer] += torch.bincount(idx.flatten(), minlength=seen.shape[1])
                return inner.forward(layer, x, idx, w)

        model.experts = Spy()
        for s in range(0, len(ids), 16):
            model(torch.tensor(ids[s:s + 16]), 0)
    assert n == len(ids)
    assert counts == tuple(tuple(r) for r in seen.tolist())
    assert all(sum(row) == 2 * n for row in counts)  # k = 2 choices per token per layer
    assert len({row for row in counts}) > 1 or len(set(counts[0])) > 1  # not all the same


def test_calibrate_cli_writes_counts_and_keeps_records(model_file, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    with MoepackFile(model_file) as f:
        before = {e: bytes(f.expert_bytes(e.layer, e.expert)) for e in f.header.experts}
        tensors = {t.name: bytes(f.tensor_bytes(t.name)) for t in f.header.tensors}
        assert f.header.expert_counts is None
    r = run_cli("calibrate", model_file, text, "--ctx", "32", "--device", "cpu", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert "wrote expert counts of" in r.stdout
    with MoepackFile(model_file) as f:
        f.verify()
        counts = f.header.expert_counts
        assert counts is not None and len(counts) == f.config.num_hidden_layers
        assert {t.name: bytes(f.tensor_bytes(t.name)) for t in f.header.tensors} == tensors
        for e in f.header.experts:
            assert bytes(f.expert_bytes(e.layer, e.expert)) == before[next(b for b in before if (b.layer, b.expert) == (e.layer, e.expert))]
    report = json.loads(run_cli("inspect", model_file, "--json").stdout)
    rt = report["expert_routing"]
    assert report["has_expert_counts"] and rt["layers"][0]["counts"] == list(counts[0])
    assert abs(sum(rt["layers"][0]["shares"]) - 1) < 1e-3
    text_report = run_cli("inspect", model_file).stdout
    assert "* expert routing counts (moe-pack calibrate)" in text_report and "top-k" in text_report


def test_inspect_without_counts_says_how_to_get_them(model_file):
    out = run_cli("inspect", model_file).stdout
    assert "none recorded (run `moe-pack calibrate FILE TEXT`)" in out
    assert json.loads(run_cli("inspect", model_file, "--json").stdout)["expert_routing"] is None


def test_rewrite_header_refuses_moved_records(model_file):
    with MoepackFile(model_file) as f:
        h = f.header
    moved = dataclasses.replace(h, experts=(dataclasses.replace(h.experts[0], crc32=h.experts[0].crc32 ^ 1),) + h.experts[1:])
    before = model_file.read_bytes()
    with pytest.raises(LayoutError, match="only metadata may change"):
        rewrite_header(model_file, moved)
    assert model_file.read_bytes() == before
    assert not list(model_file.parent.glob(".*.tmp"))


def test_calibrate_bad_input_is_one_line(model_file, tmp_path):
    assert_user_error(run_cli("calibrate", model_file, tmp_path / "missing.txt"), "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert_user_error(run_cli("calibrate", model_file, empty), "empty")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert_user_error(run_cli("calibrate", model_file, text, "--ctx", "0"), "--ctx")
    not_moepack = tmp_path / "x.moepack"
    not_moepack.write_bytes(b"hello")
    assert_user_error(run_cli("calibrate", not_moepack, text), "magic")
