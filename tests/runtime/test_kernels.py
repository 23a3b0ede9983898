"""Fused Triton kernels (runtime/kernels) against the format's reference decoder.

Without CUDA the kernels run under the Triton interpreter on CPU tensors in float32
(relative error < 1e-5); with CUDA the same cases run compiled, with float16 activations.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from formats.errors import ConfigError, LayoutError
from formats.qtensor import QuantSpec
from runtime.dequant import component_tensors

from .kernel_cases import (  # noqa: F401 (_interpreter, poison: fixtures)
    ACT, CASES, CUDA, DEVICES, FLOAT_TOL, _interpreter, on_device, packed, poison, reference_matmul, rel_err,
)

# after kernel_cases, which sets up the interpreter before runtime.kernels loads the kernels
from runtime.kernels import GemvConfig, dequantize_into, gemv_supported, qmatmul, use_fused  # noqa: E402
from runtime.kernels import dispatch, qgemv  # noqa: E402
from runtime.kernels.configs import candidate_configs, pick_gemv_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ fused GEMV

def test_gemv_cases_cover_each_launch_variant():
    """EVEN launches (the tile grid covers the matrix exactly) load without masks: the cases
    below must run both kinds, or a wrong unmasked load could go unseen."""
    plans = [qgemv.launch_plan(torch.zeros(p.values[2], p.values[1][1]), p.values[1], p.values[0], False,
                               p.values[3]).kwargs for p in CASES]
    for flag in ("EVEN", "ROW_META"):  # ROW_META: one (step, min) load per tile row
        assert any(kw[flag] for kw in plans) and not all(kw[flag] for kw in plans), flag


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec,shape,tokens,config", CASES)
def test_gemv_matches_reference(device, spec, shape, tokens, config, poison):
    dtype, tol = ACT[device]
    data, w = packed(shape, spec, seed=spec.bits * 1000 + spec.group_size + shape[0])
    comps = component_tensors(on_device(data, device), shape, spec)
    x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(tokens)).to(device, dtype)
    assert gemv_supported(shape, spec)
    y = qgemv.gemv(x, [comps], shape, spec, config)
    assert y is not None and y.shape == (tokens, shape[0]) and y.dtype == dtype
    if device == "cpu" and not qgemv.launch_plan(x, shape, spec, False, config).int_x:
        tol = FLOAT_TOL
    assert rel_err(y, reference_matmul(x, w)) < tol


# int16 activations (dp2a on the GPU, its integer emulation here): every code width it takes,
# each meta kind, tile rows inside one meta group (ROW_META), split-K, padded token tiles,
# ragged rows and K tails inside a tile
INT_CASES = [
    (QuantSpec(2, 16, 8, 128), (37, 256), 1, GemvConfig(int_x=True)),
    (QuantSpec(2, 16, 4, 4), (32, 256), 3, GemvConfig(block_n=16, block_k=64, int_x=True)),  # ROW_META
    (QuantSpec(2, 64, 16), (70, 384), 5, GemvConfig(block_n=16, block_k=128, split_k=2, int_x=True)),
    (QuantSpec(2, 32, 8, 24), (33, 128), 8, GemvConfig(block_n=32, block_k=512, int_x=True)),  # K tail masked
    (QuantSpec(4, 8, 8, 128), (16, 256), 2, GemvConfig(block_n=8, block_k=32, split_k=3, int_x=True)),
    (QuantSpec(4, 64, 4, 5), (70, 256), 1, GemvConfig(block_n=16, block_k=128, int_x=True)),
    (QuantSpec(8, 8, 8, 256), (16, 128), 3, GemvConfig(int_x=True)),
    (QuantSpec(8, 32, 16), (24, 96), 1, GemvConfig(block_n=8, block_k=32, int_x=True)),
    # 3-bit: the low plane's words with the high plane's bit OR-ed in
    (QuantSpec(3, 64, 8, 128), (37, 256), 1, GemvConfig(int_x=True)),
    (QuantSpec(3, 16, 4, 4), (32, 256), 3, GemvConfig(block_n=16, block_k=64, int_x=True)),  # ROW_META
    (QuantSpec(3, 32, 16), (33, 384), 8, GemvConfig(block_n=32, block_k=512, split_k=2, int_x=True)),  # K tail
    # one token over an exactly covered matrix: compiled, meta whose addresses repeat along the
    # tile loads through _gather's inline assembly (4-bit codes; a group over several words;
    # (step, min) per word; f16 scales)
    (QuantSpec(2, 16, 4, 128), (32, 512), 1, GemvConfig(block_n=16, block_k=256, int_x=True)),
    (QuantSpec(4, 64, 8, 256), (32, 512), 1, GemvConfig(block_n=16, block_k=256, int_x=True)),
    (QuantSpec(2, 16, 8, 4), (32, 512), 1, GemvConfig(block_n=16, block_k=256, int_x=True)),
    (QuantSpec(3, 64, 16), (32, 512), 1, GemvConfig(block_n=16, block_k=256, int_x=True)),
]
GATHER_CASES = INT_CASES[-4:]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec,shape,tokens,config", INT_CASES,
                         ids=[f"b{c[0].bits}-m{c[0].meta_bits}-g{c[0].group_size}-{c[1][0]}x{c[1][1]}-T{c[2]}"
                              for c in INT_CASES])
def test_gemv_with_int16_activations(device, spec, shape, tokens, config, poison):
    dtype, tol = ACT[device]
    data, w = packed(shape, spec, seed=spec.bits * 100 + shape[0])
    comps = component_tensors(on_device(data, device), shape, spec)
    x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(7)).to(device, dtype)
    x[:, :16] *= 50  # one word with an outlier: its scale must not leak into the others
    plan = qgemv.launch_plan(x, shape, spec, False, config)
    assert plan.int_x and plan.kwargs["INT_X"] and not plan.permute
    y = qgemv.gemv(x, [comps], shape, spec, config)
    assert y.shape == (tokens, shape[0]) and y.dtype == dtype
    assert rel_err(y, reference_matmul(x, w)) < tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("int_x", [False, True])
def test_split_k_tiles_past_k_read_no_meta_past_the_matrix(device, int_x, poison):
    """7 tiles of K in 2 slices of 4: the second slice's last tile lies past K. Its codes are
    masked, and so must its (step, min) loads be (ROW_META): for the last row they would read
    the meta group after the matrix's last, here NaN bytes, and NaN * 0 is NaN."""
    spec, shape = QuantSpec(2, 16, 8, 4), (32, 448)
    config = GemvConfig(block_n=16, block_k=64, split_k=2, int_x=int_x)
    data, w = packed(shape, spec, seed=5)
    buf = on_device(data + b"\xff" * 256, device)  # 0xffffffff: a float32 NaN
    comps = component_tensors(buf[: len(data)], shape, spec)
    x = torch.randn(2, shape[1], generator=torch.Generator().manual_seed(5)).to(device, ACT[device][0])
    plan = qgemv.launch_plan(x, shape, spec, False, config)
    assert plan.kwargs["ROW_META"] and not plan.kwargs["EVEN"]
    y = qgemv.gemv(x, [comps], shape, spec, config)
    assert torch.isfinite(y).all()
    assert rel_err(y, reference_matmul(x, w)) < ACT[device][1]


def test_planes_and_meta_whose_elements_are_not_back_to_back_take_the_fallback():
    """The kernels address row r of a plane at r * its width, and a group's scale at its flat
    index: a row-strided plane or a strided scale array must not reach them."""
    from runtime.kernels.words import operand_args

    spec, shape = QuantSpec(2, 16, 8, 128), (32, 256)
    data, _ = packed(shape, spec, seed=1)
    comps = component_tensors(on_device(data, "cpu"), shape, spec)
    assert operand_args(comps) is not None
    wide = torch.zeros(shape[0], 2 * comps["q"].shape[1], dtype=torch.uint8)
    wide[:, : comps["q"].shape[1]] = comps["q"]
    assert operand_args({**comps, "q": wide[:, : comps["q"].shape[1]]}) is None  # word aligned, rows apart
    assert operand_args({**comps, "scale": torch.repeat_interleave(comps["scale"], 2)[::2]}) is None
    x = torch.randn(1, shape[1])
    assert qgemv.gemv(x, [{**comps, "q": wide[:, : comps["q"].shape[1]]}], shape, spec) is None


def test_gather_cases_take_the_gather():
    """GATHER_CASES are the launches whose meta loads go through _gather once compiled: one
    token, unmasked, and meta other than one 8-bit code per word with row meta."""
    for spec, shape, tokens, config in GATHER_CASES:
        kw = qgemv.launch_plan(torch.zeros(tokens, shape[1]), shape, spec, False, config).kwargs
        assert kw["INT_X"] and kw["EVEN"] and kw["BT"] == 1, (spec, kw)
        per = 32 // (2 if spec.bits == 3 else spec.bits)
        assert not (spec.meta_bits == 8 and spec.group_size == per and kw["ROW_META"]), spec
    rows = {qgemv.launch_plan(torch.zeros(1, c[1][1]), c[1], c[0], False, c[3]).kwargs["ROW_META"] for c in GATHER_CASES}
    assert rows == {True, False}


@pytest.mark.cuda
@pytest.mark.parametrize("spec,shape,tokens,config",
                         INT_CASES[:2] + INT_CASES[4:5] + INT_CASES[6:7] + INT_CASES[8:9] + GATHER_CASES)
def test_dp2a_is_its_emulation_bit_for_bit(spec, shape, tokens, config, monkeypatch):
    """The pieces the interpreter cannot run: PTX's dp2a against the integer arithmetic the
    CPU tests check, and _gather's inline-asm loads against tl.load. Same int32 sums from the
    same meta, so the same output bits."""
    data, _ = packed(shape, spec, seed=3)
    comps = component_tensors(on_device(data, "cuda"), shape, spec)
    x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(3)).to("cuda", torch.float16)
    y_asm = qgemv.gemv(x, [comps], shape, spec, config)
    monkeypatch.setattr(qgemv, "DP2A_ASM", False)
    y_emu = qgemv.gemv(x, [comps], shape, spec, config)
    assert torch.equal(y_asm, y_emu)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_x_layout(device, bits):
    """quantize_x's rows against a numpy rendering of the layout in triton_gemv: pair row
    2s + h of word w holds the activations of codes 2h*NS + s and (2h+1)*NS + s (NS = 8 // BITS)
    as int16 halves, then the word's scale and its exact sum."""
    per, ns = 32 // bits, 8 // bits
    rows, k = 3, 4 * per * 5
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(bits))
    x[1, :per] = 0.0  # an all-zero word: scale 0, codes 0
    out = qgemv.quantize_x(x.to(device), per).cpu().view(rows, per // 2 + 2, k // per).numpy()
    xw = x.numpy().reshape(rows, k // per, per)
    amax = np.abs(xw).max(-1)
    scale = (amax / 32767.0).astype(np.float32)
    np.testing.assert_allclose(out[:, per // 2].view(np.float32), scale, rtol=1e-6)
    np.testing.assert_allclose(out[:, per // 2 + 1].view(np.float32), xw.sum(-1), rtol=1e-5, atol=1e-5)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(amax[..., None] > 0, np.floor(xw * (32767.0 / amax[..., None]) + 0.5), 0).astype(np.int64)
    assert np.abs(q).max() <= 32767
    for s in range(ns):
        for h in range(2):
            lo, hi = q[..., 2 * h * ns + s], q[..., (2 * h + 1) * ns + s]
            pair = out[:, 2 * s + h].astype(np.int64)
            got_lo = ((pair & 0xFFFF) ^ 0x8000) - 0x8000  # sign-extended halves
            got_hi = pair >> 16
            # one rounding step of slack: the kernel multiplies by a float32 reciprocal
            assert np.abs(got_lo - lo).max() <= 1 and np.abs(got_hi - hi).max() <= 1, (s, h)
    assert (out[1, :, 0] == 0).all()


def test_int16_activations_only_where_the_layout_allows():
    """for_matrix drops int_x for layouts the int path does not take (groups smaller than a
    word) and clears the float path's x order when it keeps it; the heuristic picks it for 2-,
    3- and 4-bit codes unless MOEPACK_GEMV_INT=0, and takes 4-row tiles for w1/w3 at 16
    tokens (8 rows spilled)."""
    cfg = GemvConfig(int_x=True)
    assert cfg.for_matrix(4096, QuantSpec(2, 16, 8, 128)) == replace(cfg, block_k=256, permute_x=False)
    assert cfg.for_matrix(4096, QuantSpec(3, 64, 8, 128)).int_x
    assert not cfg.for_matrix(4096, QuantSpec(3, 8, 8, 128)).int_x  # 8 codes per group, 16 per word
    assert pick_gemv_config(14336, 4096, 1, QuantSpec(3, 64, 8, 128), gated=True).int_x
    assert not cfg.for_matrix(4096, QuantSpec(2, 8, 8, 128)).int_x  # 8 codes per group, 16 per word
    assert cfg.for_matrix(4096, QuantSpec(4, 8, 8, 128)).int_x
    assert pick_gemv_config(14336, 4096, 1, QuantSpec(2, 16, 4, 128), gated=True).int_x
    assert pick_gemv_config(4096, 4096, 1, QuantSpec(4, 64, 8, 256)).int_x  # attention
    assert not pick_gemv_config(4096, 4096, 1, QuantSpec(8, 64, 8, 256)).int_x
    assert pick_gemv_config(14336, 4096, 16, QuantSpec(2, 16, 4, 128), gated=True).block_n == 4
    assert pick_gemv_config(14336, 4096, 16, QuantSpec(2, 8, 8, 128), gated=True).block_n == 8  # float path
    assert GemvConfig(int_x=True).short().endswith("-i")


def test_int16_default_can_be_turned_off(monkeypatch):
    spec = QuantSpec(2, 16, 8, 128)
    monkeypatch.setenv("MOEPACK_GEMV_INT", "0")
    assert not pick_gemv_config(14336, 4096, 1, spec, gated=True).int_x
    cands = candidate_configs(14336, 4096, 1, spec, gated=True)
    assert any(c.int_x for c in cands) and any(not c.int_x for c in cands)  # the tuner still times both


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", [QuantSpec(2, 16, 8, 128), QuantSpec(3, 64, 16), QuantSpec(8, 8, 8, 256)])
@pytest.mark.parametrize("config", [None, GemvConfig(block_n=16, block_k=64, split_k=2)])
def test_gated_gemv(device, spec, config, poison):
    """silu(A x) * B x from one launch (or split-K partials) equals the two products."""
    dtype, tol = ACT[device]
    shape = (48, 128)
    (da, wa), (db, wb) = packed(shape, spec, 1), packed(shape, spec, 2)
    ca, cb = (component_tensors(on_device(d, device), shape, spec) for d in (da, db))
    x = torch.randn(3, shape[1], generator=torch.Generator().manual_seed(0)).to(device, dtype)
    y = qgemv.gemv(x, [ca, cb], shape, spec, config)
    ref = torch.nn.functional.silu(reference_matmul(x, wa)) * reference_matmul(x, wb)
    assert rel_err(y, ref) < tol


@pytest.mark.parametrize("device", DEVICES)
def test_qmatmul_paths(device, poison):
    """Leading dimensions, the prefill path past the threshold, and layouts the GEMV does not
    cover (K % 32 != 0, a group of 24 codes straddling 16-code words) all give W x."""
    dtype, tol = ACT[device]
    gen = torch.Generator().manual_seed(0)
    for shape, spec, lead in [
        ((40, 128), QuantSpec(4, 32, 8, 128), (2, 3)),  # fused, [2, 3, K]
        ((40, 128), QuantSpec(4, 32, 8, 128), (20,)),  # 20 tokens > threshold: dequantize + matmul
        ((21, 48), QuantSpec(2, 16, 8, 128), (2,)),  # K % 32 != 0
        ((9, 96), QuantSpec(3, 24, 16), (1,)),  # group size 24
    ]:
        data, w = packed(shape, spec, 3)
        comps = component_tensors(on_device(data, device), shape, spec)
        x = torch.randn(*lead, shape[1], generator=gen).to(device, dtype)
        y = qmatmul(x, comps, shape, spec)
        assert y.shape == (*lead, shape[0]) and y.dtype == dtype
        ref = reference_matmul(x.reshape(-1, shape[1]), w).reshape(*lead, shape[0])
        assert rel_err(y, ref) < tol, (shape, spec, lead)
    assert not gemv_supported((21, 48), QuantSpec(2, 16, 8, 128))
    assert not gemv_supported((9, 96), QuantSpec(3, 24, 16))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec,shape", [
    (QuantSpec(4, 24, 8, 5), (11, 96)),  # 8 codes per word, 3 words per group
    (QuantSpec(2, 48, 16), (6, 96)),  # 16 codes per word, 3 words per group
    (QuantSpec(8, 40, 8, 128), (7, 160)),  # 4 codes per word, 10 words per group
])
def test_gemv_group_sizes_not_powers_of_two(device, spec, shape, poison):
    """Groups that are whole words but not a power of two still take the fused GEMV, with
    groups spanning tiles (block_k 32)."""
    dtype, tol = ACT[device]
    assert gemv_supported(shape, spec)
    data, w = packed(shape, spec, 6)
    comps = component_tensors(on_device(data, device), shape, spec)
    x = torch.randn(2, shape[1], generator=torch.Generator().manual_seed(3)).to(device, dtype)
    y = qgemv.gemv(x, [comps], shape, spec, GemvConfig(block_n=8, block_k=32, split_k=2))
    assert rel_err(y, reference_matmul(x, w)) < tol


def test_qmatmul_fp16_and_bf16_activations(poison):
    """Half-precision activations are accepted and the output keeps their dtype."""
    device = "cuda" if CUDA else "cpu"
    shape, spec = (24, 64), QuantSpec(2, 16, 8, 128)
    data, w = packed(shape, spec, 4)
    comps = component_tensors(on_device(data, device), shape, spec)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        y = qmatmul(x, comps, shape, spec)
        assert y.dtype == dtype
        assert rel_err(y, reference_matmul(x, w)) < 1e-2


def test_use_fused_only_on_cuda_or_interpreter(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not use_fused(x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_fused(x)
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert not use_fused(x)
    assert not use_fused(torch.zeros(2, device="meta"))


def test_package_import_does_not_import_triton():
    code = "import sys, runtime.kernels; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)


def test_config_heuristic_splits_narrow_matrices():
    spec = QuantSpec(2, 16, 8, 128)
    wide = pick_gemv_config(14336, 4096, 1, spec, gated=True)
    narrow = pick_gemv_config(1024, 4096, 1, QuantSpec(4, 64, 8, 256))
    assert wide.split_k == 1 and narrow.split_k > 1
    cands = candidate_configs(4096, 14336, 1, spec)
    assert len(cands) == len(set(cands)) >= 10 and all(c.block_k % 32 == 0 for c in cands)
    # made valid for a shape: no tile wider than the matrix, no empty split-K slices
    cfg = GemvConfig(block_n=16, block_k=1024, split_k=64).for_matrix(96, QuantSpec(4, 32, 8, 256))
    assert cfg.block_k == 128 and cfg.split_k == 1
    assert GemvConfig(block_k=32, split_k=3).for_matrix(128, spec).split_k == 2  # 4 tiles: 2 + 2


def test_errors_are_moepack_errors():
    shape, spec = (8, 64), QuantSpec(4, 32, 8, 128)
    data, _ = packed(shape, spec, 0)
    comps = component_tensors(on_device(data, "cpu"), shape, spec)
    with pytest.raises(LayoutError, match="last dimension must be 64"):
        qmatmul(torch.zeros(1, 32), comps, shape, spec)
    with pytest.raises(ConfigError, match="dtype torch.int32"):
        qmatmul(torch.zeros(1, 64, dtype=torch.int32), comps, shape, spec)
    with pytest.raises(ConfigError, match="activations on meta"):
        qmatmul(torch.zeros(1, 64, device="meta"), comps, shape, spec)
    with pytest.raises(ConfigError, match="block_n=12"):
        GemvConfig(block_n=12)
    with pytest.raises(ConfigError, match=r"\[8, 64\]"):
        dequantize_into(comps, shape, spec, torch.empty(8, 32))


# ------------------------------------------------------------------ benchmark script

def test_kernel_bench_tiny(tmp_path, monkeypatch):
    """tools/kernel_bench.py --tiny --sweep runs and reports sane numbers (one weight width,
    one sweep config per shape: the interpreter is slow)."""
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import kernel_bench

    monkeypatch.setattr(kernel_bench, "EXPERT_SPECS", {"2-bit g16": kernel_bench.EXPERT_SPECS["2-bit g16"]})
    monkeypatch.setattr(kernel_bench, "candidate_configs", lambda *a, **k: candidate_configs(*a, **k)[:1])
    out = tmp_path / "bench.json"
    assert kernel_bench.main(["--tiny", "--tokens", "1", "--sweep", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    paths = {(r["case"], r["path"]) for r in doc["rows"]}
    assert {("expert 2-bit g16", "fused"), ("expert 2-bit g16", "dequant+mm"), ("expert 2-bit g16", "plain"),
            ("expert 2-bit g16", "indexed x2"), ("expert 2-bit g16", "fused gemm"),
            ("attention 4-bit g64", "fused"),
            ("attention 4-bit g64", "fused qkv+o")} <= paths
    assert ("expert 2-bit g16", "grouped x2") in paths  # --tiny rotates two records: two experts grouped
    for r in doc["rows"]:
        assert r["us"] > 0 and r["bytes_read"] > 0
        if r["rel_err"] is not None:
            assert r["rel_err"] < 1e-2, r
    assert doc["sweep"] and all(c["results"][0]["us"] > 0 for c in doc["sweep"])
