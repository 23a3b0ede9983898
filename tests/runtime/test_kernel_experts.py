"""A whole expert on the fused kernels: the gated w1/w3 GEMV and w2, indexed launches over
records chosen on the device, and grouped prompt blocks, against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from formats.qtensor import QuantSpec

from .kernel_cases import (  # noqa: F401 (_interpreter, poison: fixtures)
    ACT, DEVICES, _interpreter, make_expert, on_device, packed, poison, reference_expert, rel_err,
)

# after kernel_cases, which sets up the interpreter before runtime.kernels loads the kernels
from runtime.kernels import GemvConfig, fused_expert_ffn  # noqa: E402


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


def _decode_int_rows(rows: torch.Tensor, n: int, per: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_x's layout [T, (per/2 + 2) * n/per] int32 -> (x as its codes and scales give
    it [T, n] float32, sums [T, n/per])."""
    t, kw, ns = rows.shape[0], n // per, per // 4
    r = rows.view(t, per // 2 + 2, kw)
    halves = torch.stack([(r[:, :per // 2] << 16) >> 16, r[:, :per // 2] >> 16], -1)  # [T, NP, KW, 2] signed
    x = torch.empty(t, kw, per)
    for p in range(per // 2):  # pair row p = 2 s + h: codes (2h) NS + s and (2h + 1) NS + s
        s, h = divmod(p, 2)
        x[:, :, 2 * h * ns + s] = halves[:, p, :, 0].float()
        x[:, :, (2 * h + 1) * ns + s] = halves[:, p, :, 1].float()
    scale = r[:, per // 2].view(torch.float32)
    return (x * scale[:, :, None]).reshape(t, n), r[:, per // 2 + 1].view(torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec,tokens,block_n,int_x", [
    (QuantSpec(2, 16, 4, 128), 1, 16, True),  # the decode step's w1/w3 for a 2-bit w2
    (QuantSpec(3, 64, 8, 128), 2, 32, True),  # 3-bit: 2-bit-layout activations, two words a program
    (QuantSpec(4, 32, 16), 3, 8, True),  # 4-bit: 8 codes per word
    (QuantSpec(2, 16, 8, 128), 1, 16, False),  # a float-path w1/w3 (a tuned config) before an int w2
])
def test_gated_gemv_writes_the_int16_activations_w2_reads(device, spec, tokens, block_n, int_x, poison):
    """OUT_INT: the gated launch quantizes its own result per word, as quantize_x would
    quantize it (bit for bit in float32), so w2 needs no launch in between."""
    from runtime.kernels import qgemv
    from runtime.dequant import component_tensors

    dtype, _ = ACT[device]
    shape, per = (256, 128), qgemv.codes_per_word(spec)
    mats = [component_tensors(on_device(packed(shape, spec, seed)[0], device), shape, spec) for seed in (5, 6)]
    args = [qgemv.operand_args(c) for c in mats]
    x = (0.1 * torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(7))).to(device, dtype)
    cfg = GemvConfig(block_n=block_n, block_k=128, int_x=int_x)
    plan = qgemv.launch_plan(x, shape, spec, True, cfg, out_int=per)
    assert plan.out_int == per
    rows = qgemv.run_gemv(x, args, plan)
    assert rows.dtype == torch.int32 and tuple(rows.shape) == (tokens, (per // 2 + 2) * shape[0] // per)
    h = qgemv.run_gemv(x, args, qgemv.launch_plan(x, shape, spec, True, cfg))  # [T, N] in x's dtype
    ref = qgemv.quantize_x(h, per)
    got_x, got_sums = _decode_int_rows(rows.cpu(), shape[0], per)
    ref_x, ref_sums = _decode_int_rows(ref.cpu(), shape[0], per)
    if dtype == torch.float32:  # the same float32 h: the same codes and scales, sums up to their order
        pairs_and_scales = per // 2 + 1  # the rows of a token's block before its word sums
        words = shape[0] // per
        assert torch.equal(rows.view(tokens, -1, words)[:, :pairs_and_scales],
                           ref.view(tokens, -1, words)[:, :pairs_and_scales])
        torch.testing.assert_close(got_sums, ref_sums, rtol=1e-5, atol=1e-6)
    else:  # the reference quantizes h rounded to float16 first
        torch.testing.assert_close(got_x, ref_x, rtol=2e-3, atol=2e-3 * float(ref_x.abs().max()))
        torch.testing.assert_close(got_sums, ref_sums, rtol=2e-3, atol=2e-3 * float(ref_sums.abs().max()))
    torch.testing.assert_close(got_x, h.float().cpu(), rtol=0, atol=2e-3 * float(h.abs().max()))


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
