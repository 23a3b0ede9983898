"""`moe-pack imatrix SRC TEXT` on the checkpoint itself: one layer at a time, it records what
transformers' MixtralForCausalLM feeds each matrix, and its file drives `quantize --imatrix`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from formats.reader import MoepackFile
from quantize import imatrix as im
from quantize import imatrix_checkpoint as ic
from runtime.tokenizer import TextTokenizer
from quantize.source import open_checkpoint
from quantize.tensors import expert_matrix_name
from tests.quantize.helpers import one_torch_thread  # noqa: F401 (autouse fixture)
from tests.quantize.helpers import assert_user_error, packed, run_cli
from tests.quantize.test_imatrix import CTX, TEXT
from tests.runtime.packing_helpers import reference_model
from tests.tiny import make_tiny_checkpoint


def _transformers_imatrix(folder) -> dict[str, tuple[np.ndarray, int]]:
    """The same means from hooks on transformers' model, window by window (float64 sums)."""
    ref = reference_model(folder)
    cfg = ref.config
    tok = TextTokenizer(open_checkpoint(str(folder)).tokenizer)
    windows = im.text_windows(tok, tok.encode(TEXT, add_bos=False), CTX)
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}

    def add(name, x):
        x = x.detach().double().reshape(-1, x.shape[-1]).numpy()
        sums[name] = sums.get(name, 0) + (x * x).sum(0)
        rows[name] = rows.get(name, 0) + x.shape[0]

    for L, layer in enumerate(ref.model.layers):
        p = f"model.layers.{L}."
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer.self_attn, m).register_forward_pre_hook(
                lambda mod, args, name=p + f"self_attn.{m}.weight": add(name, args[0]))

        def experts_hook(mod, args, L=L):
            x, idx = args[0], args[1]  # [T, H], [T, k]
            for e in range(cfg.num_local_experts):
                hit = (idx == e).any(dim=1)
                if not hit.any():
                    continue
                xr = x[hit]
                add(expert_matrix_name(L, e, "w1"), xr)
                add(expert_matrix_name(L, e, "w3"), xr)
                gate, up = torch.nn.functional.linear(xr, mod.gate_up_proj[e]).chunk(2, dim=-1)
                add(expert_matrix_name(L, e, "w2"), torch.nn.functional.silu(gate) * up)

        layer.mlp.experts.register_forward_pre_hook(experts_hook)
    with torch.no_grad():
        for w in windows:
            ref(torch.tensor([w]))
    return {k: (sums[k] / rows[k], rows[k]) for k in sums}


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 5}], ids=["full", "sliding-window"])
def test_inputs_equal_transformers(tmp_path, overrides):
    folder = make_tiny_checkpoint(tmp_path / "ckpt", seed=3, **overrides)
    got = ic.measure_checkpoint(str(folder), TEXT, ctx=CTX, device="cpu", progress=False)
    want = _transformers_imatrix(folder)
    assert got.entries.keys() == want.keys()
    for name, (mean, n) in want.items():
        assert got.entries[name][1] == n, name
        np.testing.assert_allclose(got.entries[name][0], mean, rtol=2e-4, atol=1e-7, err_msg=name)
    assert got.model == folder.name


@pytest.mark.parametrize("limits", [{"EXPERT_ROWS": 3}, {"HELD_MID_ROWS": 0}, {"EXPERT_ROWS": 3, "HELD_MID_ROWS": 0}],
                         ids=["chunks", "w2-inputs-made-again", "both"])
def test_fewer_rows_per_expert_matmul_give_the_same_means(tiny_checkpoint, monkeypatch, limits):
    """The later layers' means depend on the earlier layers' outputs: equal means, equal outputs."""
    a = ic.measure_checkpoint(str(tiny_checkpoint), TEXT, ctx=CTX, device="cpu", progress=False)
    for name, value in limits.items():
        monkeypatch.setattr(ic, name, value)
    b = ic.measure_checkpoint(str(tiny_checkpoint), TEXT, ctx=CTX, device="cpu", progress=False)
    assert a.entries.keys() == b.entries.keys()
    for name, (mean, n) in a.entries.items():
        assert b.entries[name][1] == n
        np.testing.assert_allclose(b.entries[name][0], mean, rtol=1e-5, err_msg=name)


def test_the_checkpoint_and_its_16_bit_file_measure_alike(tiny_checkpoint, tmp_path_factory):
    """The two ways of measuring name the same matrices and agree up to float16 weights."""
    f16 = packed(tmp_path_factory, tiny_checkpoint, "--attn-bits", "16", "--expert-bits", "16")
    a = ic.measure_checkpoint(str(tiny_checkpoint), TEXT, ctx=CTX, device="cpu", progress=False)
    b = im.measure(f16, TEXT, ctx=CTX, device="cpu", progress=False)
    assert a.tokens == b.tokens and a.text_sha256 == b.text_sha256
    assert a.entries.keys() == b.entries.keys()
    for name, (mean, n) in a.entries.items():
        assert b.entries[name][1] == n, name
        np.testing.assert_allclose(b.entries[name][0], mean, rtol=2e-2, atol=1e-4, err_msg=name)


def test_cli_measures_the_checkpoint_and_quantize_uses_it(tiny_checkpoint, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    out = tmp_path / "ckpt.imatrix"
    r = run_cli("imatrix", tiny_checkpoint, text, "-o", out, "--ctx", CTX, "--device", "cpu", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert "attention matrices measured" in r.stdout
    loaded = im.load(out)
    assert loaded.model == tiny_checkpoint.name and loaded.tokens > 0
    q = tmp_path / "q.moepack"
    r = run_cli("quantize", tiny_checkpoint, "-o", q, "--imatrix", out, "--device", "cpu", "--quiet")
    assert r.exit_code == 0, r.stderr
    measured = sum(1 for _, rows in loaded.entries.values() if rows > 0)
    assert f"weighted by {out}: {measured} matrices" in r.stdout
    with MoepackFile(q) as f:
        f.verify()
        assert f.header.quantizer.method == "weighted-lsq" and out.name in f.header.quantizer.method_version


def test_cli_refuses_what_it_cannot_use(tiny_checkpoint, tmp_path, tmp_path_factory):
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    out = tmp_path / "x.imatrix"
    r = run_cli("imatrix", tmp_path / "missing", text, "-o", out, "--quiet")
    assert_user_error(r, "missing")
    f16 = packed(tmp_path_factory, tiny_checkpoint, "--attn-bits", "16", "--expert-bits", "16")
    assert_user_error(run_cli("imatrix", f16, text, "-o", out, "--revision", "main", "--quiet"), "--revision")
    assert_user_error(run_cli("imatrix", tiny_checkpoint, text, "-o", out, "--ctx", "1", "--quiet"), "--ctx 1")
    assert_user_error(run_cli("imatrix", tmp_path / "typo.moepack", text, "-o", out, "--quiet"), "no such .moepack file")
    assert not out.exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_measured_on_cuda_as_on_the_cpu(tiny_checkpoint):
    a = ic.measure_checkpoint(str(tiny_checkpoint), TEXT, ctx=CTX, device="cpu", progress=False)
    b = ic.measure_checkpoint(str(tiny_checkpoint), TEXT, ctx=CTX, device="cuda", progress=False)
    assert a.entries.keys() == b.entries.keys()
    for name, (mean, n) in a.entries.items():
        assert b.entries[name][1] == n, name
        np.testing.assert_allclose(b.entries[name][0], mean, rtol=1e-3, atol=1e-6, err_msg=name)
