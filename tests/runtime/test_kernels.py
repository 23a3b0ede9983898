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
from formats.header import ExpertLayout, MatrixLayout
from formats.qtensor import QuantSpec, component_views, decode_matrix, encode_matrix
from formats.spec import ALIGNMENT, COMPONENT_ALIGNMENT, align_up
from formats.writer import pack_expert
from runtime.dequant import component_tensors

from .interpreter import interpreted_kernels, use_interpreter

CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[2]

triton_gemv, triton_dequant, _, _ = interpreted_kernels()  # interpreted without CUDA (tests/runtime/interpreter.py)

from runtime.kernels import (  # noqa: E402
    GemvConfig,
    dequantize_into,
    fused_expert_ffn,
    gemv_supported,
    qmatmul,
    release_scratch,
    use_fused,
)
from runtime.kernels import dispatch, prefill, qgemv  # noqa: E402
from runtime.kernels.configs import candidate_configs, pick_gemv_config  # noqa: E402

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(CUDA, reason="kernels are compiled for CUDA in this session")),
    pytest.param("cuda", marks=pytest.mark.cuda),
]
# (activation dtype, relative tolerance) per device: float32 under the interpreter, float16 on
# the GPU. The int16-activation path (GemvConfig.int_x, the heuristic's choice for 2-, 3- and
# 4-bit codes) rounds each activation to 1/65534 of its word's largest: ~2e-5 relative on these
# cases, so the CPU bound is 1e-4; the float path keeps 1e-5 (FLOAT_TOL,
# test_gemv_matches_reference).
ACT = {"cpu": (torch.float32, 1e-4), "cuda": (torch.float16, 3e-3)}
FLOAT_TOL = 1e-5


# ------------------------------------------------------------------ helpers

@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    use_interpreter(monkeypatch)


def packed(shape, spec, seed):
    """(bytes, reference W float32 [N, K]) of a random matrix encoded by formats.qtensor."""
    rng = np.random.default_rng(seed)
    n, k = shape
    groups = n * k // spec.group_size
    q = rng.integers(0, 1 << spec.bits, size=shape)
    data = encode_matrix(spec, q=q, scale=rng.uniform(0.01, 0.1, groups),
                         zero=rng.uniform(0, (1 << spec.bits) - 1, groups))
    return data, decode_matrix(component_views(data, shape, spec), shape, spec)


def on_device(data: bytes, device: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double().cpu(), ref.double().cpu()
    return float((y - ref).norm() / ref.norm())


def reference_matmul(x: torch.Tensor, w: np.ndarray) -> torch.Tensor:
    return x.double().cpu() @ torch.from_numpy(w).double().T


@pytest.fixture
def poison(monkeypatch):
    """Every kernel output and the prefill scratch start as NaN: a value the kernel forgets
    to write shows up as NaN in the result."""
    def nan_alloc(shape, dtype, device):
        # integer buffers (the int16 activations) get a value no kernel writes there
        return torch.full(shape, float("nan") if dtype.is_floating_point else -0x5A5A5A5A, dtype=dtype, device=device)

    monkeypatch.setattr(qgemv, "_alloc", nan_alloc)
    release_scratch()
    for device in ("cuda",) if CUDA else ("cpu",):
        for dtype in (torch.float16, torch.float32):
            prefill.scratch(torch.device(device), dtype, 1 << 16).fill_(float("nan"))
    yield
    release_scratch()


# every weight width x meta kind x group size, each on one of a few shapes and launch configs
# (the product of all of them would take minutes in the interpreter)
SHAPES = [(37, 256, 1), (5, 128, 2), (70, 128, 5), (16, 256, 8), (33, 384, 1)]
CONFIGS = [
    None,  # the shape heuristic
    GemvConfig(block_n=64, block_k=512),  # one program, K tail masked inside the tile
    GemvConfig(block_n=16, block_k=128, split_k=2),  # split-K partial sums
    GemvConfig(block_n=32, block_k=32, split_k=3, num_warps=2),  # uneven split-K, smallest tile
    GemvConfig(block_n=16, block_k=128, permute_x=False),  # activations gathered at stride PER
]
META_GROUPS = [128, 256, 24, 1]
CASES = []
for i, (bits, meta, g) in enumerate((b, m, g) for b in (2, 3, 4, 8) for m in (8, 16) for g in (8, 16, 32, 64, 128)):
    n, k, t = SHAPES[i % len(SHAPES)]
    k = max(k, 128) if g == 128 else k
    spec = QuantSpec(bits, g, meta, META_GROUPS[i % len(META_GROUPS)] if meta == 8 else 0)
    config = CONFIGS[(i + i // len(SHAPES)) % len(CONFIGS)]  # vary which shape meets which config
    CASES.append(pytest.param(spec, (n, k), t, config, id=f"b{bits}-m{meta}-g{g}-{n}x{k}-T{t}"))
# launches whose tile rows lie inside one meta group (ROW_META: (step, min) loaded per row)
for spec, shape, t, config in [
    (QuantSpec(2, 16, 8, 4), (32, 256), 1, GemvConfig(block_n=16, block_k=64)),
    (QuantSpec(3, 32, 8, 2), (24, 256), 2, GemvConfig(block_n=8, block_k=64, split_k=2)),
    (QuantSpec(4, 16, 8, 8), (40, 128), 3, GemvConfig(block_n=16, block_k=128)),
]:
    CASES.append(pytest.param(spec, shape, t, config, id=f"rowmeta-b{spec.bits}-{shape[0]}x{shape[1]}-T{t}"))
# 4-bit meta codes (format version 2), two per byte: each width once, odd group counts per row
# (rows starting on a high nibble), meta groups of 1 and odd sizes, and a ROW_META launch
for spec, shape, t, config in [
    (QuantSpec(2, 16, 4, 128), (37, 256), 1, None),
    (QuantSpec(3, 32, 4, 24), (5, 128), 2, CONFIGS[2]),
    (QuantSpec(4, 8, 4, 1), (70, 128), 5, CONFIGS[3]),
    (QuantSpec(8, 64, 4, 256), (16, 256), 8, CONFIGS[4]),
    (QuantSpec(2, 128, 4, 5), (33, 384), 1, CONFIGS[1]),  # 3 groups per row
    (QuantSpec(2, 16, 4, 4), (32, 256), 1, GemvConfig(block_n=16, block_k=64)),  # ROW_META
]:
    CASES.append(pytest.param(spec, shape, t, config, id=f"m4-b{spec.bits}-g{spec.group_size}-{shape[0]}x{shape[1]}-T{t}"))


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
]


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


@pytest.mark.cuda
@pytest.mark.parametrize("spec,shape,tokens,config", INT_CASES[:2] + INT_CASES[4:5] + INT_CASES[6:7] + INT_CASES[8:9])
def test_dp2a_is_its_emulation_bit_for_bit(spec, shape, tokens, config, monkeypatch):
    """The one piece the interpreter cannot run: PTX's dp2a against the integer arithmetic
    the CPU tests check. Same int32 sums, so the same output bits."""
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


# ------------------------------------------------------------------ dequantize kernel

DEQUANT_CASES = [pytest.param(p.values[0], (p.values[1][0], p.values[1][1]), id=p.id.rsplit("-T", 1)[0]) for p in CASES]
DEQUANT_CASES += [
    pytest.param(QuantSpec(2, 8, 8, 16), (3, 24), id="K24"),
    pytest.param(QuantSpec(3, 8, 16), (5, 40), id="K40-3bit"),
    pytest.param(QuantSpec(3, 24, 8, 7), (7, 96), id="g24"),
    pytest.param(QuantSpec(4, 16, 16), (4, 48), id="K48"),
    pytest.param(QuantSpec(8, 40, 8, 3), (6, 120), id="g40-8bit"),
    # the word-wise kernel's grid covering the matrix exactly (EVEN: unmasked loads and stores)
    pytest.param(QuantSpec(2, 16, 8, 128), (16, 512), id="even-2bit"),
    pytest.param(QuantSpec(3, 64, 8, 128), (32, 512), id="even-3bit"),
    pytest.param(QuantSpec(4, 64, 16), (16, 256), id="even-4bit"),
    pytest.param(QuantSpec(3, 64, 4, 128), (32, 512), id="even-3bit-m4"),
    pytest.param(QuantSpec(2, 8, 4, 16), (3, 24), id="K24-m4"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec,shape", DEQUANT_CASES)
def test_dequantize_kernel_is_exact(device, spec, shape):
    data, w = packed(shape, spec, 5)
    comps = component_tensors(on_device(data, device), shape, spec)
    out = torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    dequantize_into(comps, shape, spec, out)
    assert np.array_equal(out.cpu().numpy(), w)  # same float32 operations as the reference, no FMA
    half = torch.full(shape, float("nan"), dtype=torch.float16, device=device)
    dequantize_into(comps, shape, spec, half)
    assert torch.allclose(half.cpu().float(), torch.from_numpy(w).half().float(), rtol=1e-3, atol=1e-3)


# the fused dequantize-GEMM (prefill): every width, meta kind, a per-code group case, and
# shapes whose M, N and K tails the tiles do not cover
GEMM_CASES = [
    (QuantSpec(2, 16, 8, 128), (70, 256), 37),
    (QuantSpec(2, 8, 8, 16), (33, 128), 65),  # groups of 8: two per word, scales per code
    (QuantSpec(3, 64, 8, 128), (64, 192), 20),
    (QuantSpec(3, 32, 16), (40, 96), 17),
    (QuantSpec(4, 64, 8, 256), (96, 320), 64),
    (QuantSpec(4, 16, 16), (20, 64), 3),
    (QuantSpec(8, 32, 8, 24), (24, 160), 18),
    (QuantSpec(2, 16, 4, 128), (70, 256), 37),  # 4-bit meta codes
    (QuantSpec(2, 8, 4, 3), (33, 128), 65),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec,shape,tokens", GEMM_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_fused_gemm_matches_dequantize_and_matmul(device, spec, shape, tokens, monkeypatch):
    """qgemm_kernel decodes the same weights as the dense path (rounded to x's dtype) and
    multiplies them; MOEPACK_PREFILL=fused sends prefill_matmul there."""
    dtype, tol = ACT[device]
    data, w = packed(shape, spec, 7)
    comps = component_tensors(on_device(data, device), shape, spec)
    x = (0.1 * torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(4))).to(device, dtype)
    ref = reference_matmul(x, torch.from_numpy(w).to(dtype).float().numpy())  # W as the dense path rounds it
    y = prefill.fused_gemm(x, comps, shape, spec, config=(16, 16, 64, 4, 1))
    assert y.shape == (tokens, shape[0]) and y.dtype == dtype
    assert rel_err(y, ref) < (tol if device == "cpu" else 2e-3)
    monkeypatch.setenv(prefill.PREFILL_ENV, "fused")
    calls = []
    monkeypatch.setattr(prefill, "fused_gemm", lambda *a, **k: calls.append(1) or y)
    assert prefill.prefill_matmul(x, comps, shape, spec) is y and calls


def test_prefill_mode_is_validated(monkeypatch):
    monkeypatch.setenv(prefill.PREFILL_ENV, "fast")
    with pytest.raises(ConfigError, match="MOEPACK_PREFILL='fast'"):
        prefill.prefill_mode()
    monkeypatch.setenv(prefill.PREFILL_ENV, "")
    assert prefill.prefill_mode() == "dequant"


def test_dequantize_cases_cover_both_kernels():
    """The word-wise kernel takes the usual layouts, the byte-wise one the rest: the cases
    above run both (a change to the dispatch that sent everything one way would go unseen)."""
    words = [prefill._words(*(lambda c: (c["q"], c.get("q_hi", c["q"])))(
        component_tensors(on_device(packed(p.values[1], p.values[0], 0)[0], "cpu"), p.values[1], p.values[0])),
        p.values[1], p.values[0]) is not None for p in DEQUANT_CASES]
    assert any(words) and not all(words)


def test_dequantize_words_need_aligned_planes():
    """A plane that does not start on a 4-byte boundary cannot be read as words (the caller then
    takes the byte-wise kernel)."""
    spec, shape = QuantSpec(2, 16, 8, 128), (8, 64)
    plane = torch.zeros(8, 20, dtype=torch.uint8)
    assert prefill._words(plane[:, :16], plane[:, :16], shape, spec) is not None
    assert prefill._words(plane[:, 1:17], plane[:, :16], shape, spec) is None
    spec3 = QuantSpec(3, 16, 8, 128)  # its high plane is read as 16-bit half-words
    assert prefill._words(plane[:, :16], plane[:, 2:10], shape, spec3) is not None
    assert prefill._words(plane[:, :16], plane[:, 1:9], shape, spec3) is None


# ------------------------------------------------------------------ one expert

def make_expert(hidden: int, inter: int, spec: QuantSpec, seed: int):
    """(layout, record bytes, {name: reference W}) of one random expert."""
    mats, offset, data, ref = [], 0, {}, {}
    for i, (name, shape) in enumerate((("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter)))):
        mats.append(MatrixLayout(name, shape, spec, offset))
        offset = align_up(offset + mats[-1].nbytes, COMPONENT_ALIGNMENT)
        data[name], ref[name] = packed(shape, spec, seed + i)
    layout = ExpertLayout(align_up(offset, ALIGNMENT), tuple(mats))
    return layout, pack_expert(layout, data), ref


def reference_expert(x: torch.Tensor, ref: dict) -> torch.Tensor:
    h = torch.nn.functional.silu(reference_matmul(x, ref["w1"])) * reference_matmul(x, ref["w3"])
    return h @ torch.from_numpy(ref["w2"]).double().T


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec,hidden,inter,tokens,configs", [
    (QuantSpec(2, 16, 8, 128), 64, 128, 1, None),
    (QuantSpec(3, 64, 8, 128), 64, 128, 3, {"w13": GemvConfig(16, 64, split_k=2)}),  # gated split-K
    (QuantSpec(8, 32, 16), 64, 128, 2, {"w2": GemvConfig(16, 64, split_k=2, permute_x=False)}),  # h not permuted
    (QuantSpec(4, 32, 16), 64, 128, 20, None),  # prefill: dequantize + matmul
    (QuantSpec(2, 24, 8, 128), 96, 192, 2, None),  # group 24: the dequantize fallback
])
def test_fused_expert_ffn(device, spec, hidden, inter, tokens, configs, poison):
    dtype, tol = ACT[device]
    layout, record, ref = make_expert(hidden, inter, spec, seed=10)
    # activations of std 0.1: the test weights are large (|W| up to ~15), and with x ~ N(0, 1)
    # the 8-bit case's outputs overflow float16 on the GPU
    x = (0.1 * torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(2))).to(device, dtype)
    y = fused_expert_ffn(on_device(record, device), layout, x, configs=configs)
    assert y.shape == (tokens, hidden) and y.dtype == dtype
    # float16 on the GPU rounds the intermediate as well: allow a few roundings more
    assert rel_err(y, reference_expert(x, ref)) < (tol if device == "cpu" else 1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec,tokens,configs", [
    (QuantSpec(2, 16, 8, 128), 1, None),
    (QuantSpec(3, 64, 8, 128), 1, {"w13": GemvConfig(16, 64, split_k=2)}),  # gated split-K: scaled after
    (QuantSpec(4, 32, 16), 2, {"w2": GemvConfig(16, 64, split_k=2, permute_x=False)}),  # h not permuted
    (QuantSpec(2, 16, 8, 128), 1, {"w2": GemvConfig(16, 128, split_k=1)}),  # w2 without split: partials anyway
    (QuantSpec(2, 16, 4, 128), 1, None),  # 4-bit meta codes
])
def test_indexed_expert_ffn_is_the_weighted_sum_of_the_chosen_experts(device, spec, tokens, configs, poison):
    """Experts chosen on the device: each program finds its record from sel, and the result
    is sum_e w[e] * FFN_sel[e](x), whatever rows sel names (repeated, in any order)."""
    from runtime.kernels import indexed_expert_ffn, indexed_supported

    dtype, tol = ACT[device]
    hidden, inter = 64, 128
    experts = [make_expert(hidden, inter, spec, seed=20 + 3 * i) for i in range(4)]
    layout = experts[0][0]
    records = torch.stack([on_device(rec, device) for _, rec, _ in experts])  # [4, record_size]
    x = (0.1 * torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(3))).to(device, dtype)
    assert indexed_supported(records, layout, x)
    for rows, weights in (([2, 0], [0.7, 0.3]), ([3, 3], [0.5, 0.5]), ([1, 3, 0], [0.2, 0.5, 0.3])):
        sel = torch.tensor(rows, dtype=torch.int64, device=device)
        w = torch.tensor(weights, dtype=dtype, device=device)
        y = indexed_expert_ffn(records, sel, w, layout, x, configs)
        assert y.shape == (tokens, hidden) and y.dtype == dtype
        ref = sum(wt * reference_expert(x, experts[r][2]) for r, wt in zip(rows, weights))
        assert rel_err(y, ref) < (tol if device == "cpu" else 1e-2), (rows, weights)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", [QuantSpec(2, 16, 8, 128), QuantSpec(3, 64, 8, 128), QuantSpec(4, 32, 16),
                                  QuantSpec(2, 16, 4, 128)], ids=lambda s: s.describe().replace(" ", "_"))
def test_grouped_expert_ffn_runs_each_block_through_its_expert(device, spec):
    """A prompt's rows sorted by expert, one launch per matrix kind for all experts: each
    block (empty ones included) comes out as its expert's FFN; row0 selects the layer."""
    from runtime.kernels import grouped_expert_ffn

    dtype, tol = ACT[device]
    hidden, inter = 64, 128
    experts = [make_expert(hidden, inter, spec, seed=40 + 3 * i) for i in range(6)]
    layout = experts[0][0]
    records = torch.stack([on_device(rec, device) for _, rec, _ in experts])  # [6, record_size]
    counts = [3, 0, 70, 2]  # the 70-row block spans two M tiles; expert 1 has none
    xs = (0.1 * torch.randn(sum(counts), hidden, generator=torch.Generator().manual_seed(5))).to(device, dtype)
    offsets = torch.tensor([0, *np.cumsum(counts)], dtype=torch.int64, device=device)
    y = grouped_expert_ffn(records, 2, offsets, xs, layout, max_rows=max(counts))  # experts 2 .. 5
    assert y.shape == xs.shape and y.dtype == dtype
    for e, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        if hi > lo:
            ref = reference_expert(xs[lo:hi], experts[2 + e][2])
            assert rel_err(y[lo:hi], ref) < (tol if device == "cpu" else 1e-2), e


def test_indexed_expert_ffn_needs_whole_aligned_records():
    from runtime.kernels import indexed_supported

    spec = QuantSpec(2, 16, 8, 128)
    layout, rec, _ = make_expert(64, 128, spec, seed=1)
    records = torch.stack([on_device(rec, "cpu")] * 2)
    x = torch.zeros(1, 64)
    assert indexed_supported(records, layout, x)
    assert not indexed_supported(records[:, : layout.record_size // 2], layout, x)  # rows too short, not contiguous
    assert not indexed_supported(records[:0], layout, x)  # no rows
    assert not indexed_supported(records, layout, torch.zeros(1, 32))  # x of the wrong width
    assert not indexed_supported(records, layout, x.to(torch.int32))


# ------------------------------------------------------------------ dispatch, configs, errors

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
