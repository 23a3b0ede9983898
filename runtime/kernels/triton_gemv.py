"""Triton kernel: fused dequantize-GEMV y[t, n] = sum_k x[t, k] * W[n, k] for a few tokens,
reading the packed planes as int32 words and never materialising W.

Layout (formats/qtensor.py, formats/packing.py): the low plane of width BL holds
PER = 32 // BL codes per little-endian word, code c at bits BL*c, so word w of row n holds
columns w*PER .. w*PER + PER - 1. 3-bit codes add a 1-bit plane (32 codes per word) whose
word w // 2, shifted right by 16 * (w % 2), holds bit 2 of the same columns.

A tile is [BLOCK_N rows, BKW words]; every tensor in the inner loop has that shape (plus a
leading token axis), so nothing is reshaped and nothing is reduced across lanes until the
program ends. Code c of every word comes out with a constant shift (the loop over c is
unrolled) and becomes a float by the exponent trick: (q | 0x4B000000) read as float32 is
2**23 + q exactly, one subtraction away from q (int-to-float converts run at a quarter of
the FMA rate on sm_90). Per group segment of a word the tile accumulates
    s * (sum_c q_c * x_c - z * sum_c x_c)
so scale and zero cost a few operations per word, not per weight.

x may come permuted (X_PERMUTED): xp[t, c, w] = x[t, w*PER + c], which makes the load of
code c's activations for BKW consecutive words one contiguous vector instead of a stride-PER
gather.

Only imported when a kernel runs: importing triton is slow and optional.
"""

from __future__ import annotations

import triton
import triton.language as tl

# No tl.sum or tl.zeros in these kernels: both are themselves @triton.jit functions, made when
# triton is first imported, and if that happened before TRITON_INTERPRET was set (hqq imports
# triton) interpreted kernels cannot call them. tl.reduce with triton's own sum combine is
# exactly tl.sum compiled, and the interpreter maps that combine to numpy.sum; tl.full
# replaces tl.zeros.
_add = getattr(tl.standard, "_sum_combine", None)
if _add is None:  # a triton without the private name: same reduction, slow in the interpreter

    @triton.jit
    def _add(a, b):
        return a + b


@triton.jit
def _load_meta(codes_ptr, meta_ptr, gidx, gmask, META8: tl.constexpr, MG):
    """Scales or zeros of groups `gidx` as float32: f16 values, or u8 codes with a float32
    (step, min) pair per MG consecutive groups."""
    if META8:
        code = tl.load(codes_ptr + gidx, mask=gmask, other=0).to(tl.float32)
        mi = gidx // MG
        step = tl.load(meta_ptr + 2 * mi, mask=gmask, other=0.0)
        lo = tl.load(meta_ptr + 2 * mi + 1, mask=gmask, other=0.0)
        return step * code + lo
    else:
        return tl.load(codes_ptr + gidx, mask=gmask, other=0.0).to(tl.float32)


@triton.jit
def _tile_update(acc, x_ptr, stride_xt, q_ptr, qh_ptr, s_ptr, sm_ptr, z_ptr, zm_ptr,
                 rows, n_mask, k0, K, MG,
                 T: tl.constexpr, BT: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
                 META8: tl.constexpr, BLOCK_N: tl.constexpr, BKW: tl.constexpr, X_PERMUTED: tl.constexpr):
    """acc [BT, BLOCK_N, BKW] += the products of the BKW words starting at column k0."""
    BL: tl.constexpr = 2 if BITS == 3 else BITS
    PER: tl.constexpr = 32 // BL
    MASK: tl.constexpr = (1 << BL) - 1
    GW: tl.constexpr = G if G < PER else PER  # codes of one word that share a group
    KW = K // PER  # words per row
    kw = k0 // PER + tl.arange(0, BKW)  # [BKW] word index in the row
    w_ok = kw < KW
    r = rows[:, None]  # [BN, 1]
    m2 = n_mask[:, None] & w_ok[None, :]  # [BN, BKW]
    words = tl.load(q_ptr + r * KW + kw[None, :], mask=m2, other=0)  # [BN, BKW] int32
    if BITS == 3:
        hi = tl.load(qh_ptr + r * (K // 32) + (kw // 2)[None, :], mask=m2, other=0)
        hi = hi >> ((kw % 2) * 16)[None, :]  # bit c = bit 2 of this word's code c
    tt = tl.arange(0, BT)[:, None, None]  # [BT, 1, 1]
    x_rows = x_ptr + tt * stride_xt
    x_mask = (tt < T) & w_ok[None, None, :]  # [BT, 1, BKW]
    for j in tl.static_range(PER // GW):
        gidx = r * (K // G) + ((kw * PER + j * GW) // G)[None, :]  # [BN, BKW] row-major group index
        s = _load_meta(s_ptr, sm_ptr, gidx, m2, META8, MG)[None, :, :]  # [1, BN, BKW]
        z = _load_meta(z_ptr, zm_ptr, gidx, m2, META8, MG)[None, :, :]
        dot = tl.full([BT, BLOCK_N, BKW], 0.0, tl.float32)
        xs = tl.full([BT, 1, BKW], 0.0, tl.float32)
        for i in tl.static_range(GW):
            c = j * GW + i  # a constexpr: j and i come from static_range
            q = (words >> (c * BL)) & MASK  # arithmetic shift is fine: the mask drops the sign bits
            if BITS == 3:
                q = q | (((hi >> c) & 1) << 2)
            qf = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # exactly q
            if X_PERMUTED:
                xo = c * KW + kw
            else:
                xo = kw * PER + c
            xv = tl.load(x_rows + xo[None, None, :], mask=x_mask, other=0.0).to(tl.float32)  # [BT, 1, BKW]
            dot += qf[None, :, :] * xv
            xs += xv
        acc += s * (dot - z * xs)
    return acc


@triton.jit
def qgemv_kernel(
    x_ptr, out_ptr, out2_ptr,
    qa_ptr, qha_ptr, sa_ptr, sma_ptr, za_ptr, zma_ptr,
    qb_ptr, qhb_ptr, sb_ptr, smb_ptr, zb_ptr, zmb_ptr,
    N, K, MG, stride_xt, stride_os, stride_ot,
    TILES: tl.constexpr, T: tl.constexpr, BT: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
    META8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, X_PERMUTED: tl.constexpr,
    GATED: tl.constexpr, PARTIAL: tl.constexpr, OUT_PER: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), split), each program TILES tiles of BLOCK_K columns. Matrix A
    (and B when GATED, same shape and spec) times x [T, K] (X_PERMUTED: [T, PER, K/PER]).
    PARTIAL: write fp32 partial sums of this K slice to out[slice] (and B's to out2[slice]);
    else write A x (or silu(A x) * B x when GATED) to out [T, N], permuted for a consumer
    with OUT_PER codes per word when OUT_PER > 1 (out[t, (n % OUT_PER) * N/OUT_PER + n / OUT_PER])."""
    BL: tl.constexpr = 2 if BITS == 3 else BITS
    BKW: tl.constexpr = BLOCK_K * BL // 32
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rows < N
    acc_a = tl.full([BT, BLOCK_N, BKW], 0.0, tl.float32)
    acc_b = tl.full([BT, BLOCK_N, BKW], 0.0, tl.float32)
    k_start = pid_k * (TILES * BLOCK_K)
    # a constant trip count (the last slice may run masked tiles past K): loop bounds that
    # depend on program ids break the Triton interpreter under numpy >= 2.4
    for i in range(TILES):
        k0 = k_start + i * BLOCK_K
        acc_a = _tile_update(acc_a, x_ptr, stride_xt, qa_ptr, qha_ptr, sa_ptr, sma_ptr, za_ptr, zma_ptr,
                             rows, n_mask, k0, K, MG, T, BT, BITS, G, META8, BLOCK_N, BKW, X_PERMUTED)
        if GATED:
            acc_b = _tile_update(acc_b, x_ptr, stride_xt, qb_ptr, qhb_ptr, sb_ptr, smb_ptr, zb_ptr, zmb_ptr,
                                 rows, n_mask, k0, K, MG, T, BT, BITS, G, META8, BLOCK_N, BKW, X_PERMUTED)

    ya = tl.reduce(acc_a, 2, _add)  # [BT, BN]: the only cross-lane reduction
    tix = tl.arange(0, BT)[:, None]
    omask = (tix < T) & n_mask[None, :]
    if PARTIAL:
        offs = tix * stride_ot + rows[None, :]
        tl.store(out_ptr + pid_k * stride_os + offs, ya, mask=omask)
        if GATED:
            tl.store(out2_ptr + pid_k * stride_os + offs, tl.reduce(acc_b, 2, _add), mask=omask)
    else:
        y = ya
        if GATED:
            # silu(A x) * B x in float32; exp of -|a| cannot overflow
            e = tl.exp(-tl.abs(ya))
            y = ya * tl.where(ya >= 0, 1.0 / (1.0 + e), e / (1.0 + e)) * tl.reduce(acc_b, 2, _add)
        if OUT_PER > 1:
            cols = (rows % OUT_PER) * (N // OUT_PER) + rows // OUT_PER
        else:
            cols = rows
        tl.store(out_ptr + tix * stride_ot + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=omask)
