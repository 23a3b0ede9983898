"""Triton kernel: fused dequantize-GEMM y[m, n] = sum_k x[m, k] * W[n, k] for many tokens
(prefill), decoding each tile of W in registers and multiplying it on the tensor cores.

Why: the prefill path otherwise writes every expert matrix densely (2 bytes per weight) into a
scratch buffer and reads it back in cuBLAS, 4 bytes of traffic per weight against the ~0.4 the
packed matrix holds. Here a program decodes a [BLOCK_N, BLOCK_K] tile of W with
dequant_words_kernel's float32 arithmetic, rounded to x's dtype, and feeds it to tl.dot against
a [BLOCK_M, BLOCK_K] tile of x. Unlike the dequantize launches, this one keeps the compiler's
FMA contraction (step * code + min in one rounding), so a weight can differ from the dense
path's by one float32 ulp before the rounding to x's dtype: the decode is ALU work inside the
GEMM's loop, where turning contraction off would cost instructions not yet measured. Each
program re-decodes its W tiles, so the win needs few M tiles per matrix: a prompt's tokens per
expert, not a batch of thousands.

GATED: two matrices of one shape (an expert's w1 and w3), silu(x A^T) * (x B^T) written.
GROUPED: a third grid axis over a layer's experts, for the rows of x sorted by expert: program
e multiplies rows offs[e] .. offs[e+1] by the matrices of record row ROW0 + e of a buffer of
records RS bytes apart (operand pointers: those of row 0), so a layer's experts are one launch
per matrix kind with nothing read back to the host (the offsets are computed on the device).

Layouts: those of the word kernels (runtime/kernels/words.py): K % 32 == 0, groups of whole
words or words of whole groups.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_dequant import _decode_words
from .triton_gemv import _to_record


@triton.jit
def _decode_tile(q_ptr, qh_ptr, s_ptr, sm_ptr, z_ptr, zm_ptr, r, kw0, N, K, dtype: tl.constexpr,
                 MG: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, MB: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[r, kw0 * PER : kw0 * PER + BLOCK_K] as `dtype` [BLOCK_N, BLOCK_K] (r: [BLOCK_N, 1] rows;
    zeros outside the matrix), rounded as the dense path rounds it."""
    BW: tl.constexpr = BLOCK_K // (32 // (2 if BITS == 3 else BITS))  # words per row of a tile
    kw = (kw0 + tl.arange(0, BW))[None, :]  # [1, BW]
    w = _decode_words(q_ptr, qh_ptr, s_ptr, sm_ptr, z_ptr, zm_ptr, r, kw, N, K, MG, BITS, G, MB, False)
    return tl.reshape(w.to(dtype), (BLOCK_N, BLOCK_K))  # column kw * PER + c


@triton.jit
def qgemm_kernel(
    x_ptr, out_ptr,
    qa_ptr, qha_ptr, sa_ptr, sma_ptr, za_ptr, zma_ptr,
    qb_ptr, qhb_ptr, sb_ptr, smb_ptr, zb_ptr, zmb_ptr,
    offs_ptr, ROW0, RS,
    M, N, K, stride_xm, stride_om,
    MG: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, MB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr,
    IEEE: tl.constexpr = False, GATED: tl.constexpr = False, GROUPED: tl.constexpr = False,
):
    """Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)) (GROUPED: M is the most rows one expert has,
    and a third axis runs the experts); x [rows, K] and out [rows, N] with unit column stride;
    BLOCK_K a multiple of the codes per word, K_TILES = cdiv(K, BLOCK_K) (a constant trip
    count: a runtime one breaks the Triton interpreter under numpy >= 2.4). IEEE: float32 x
    multiplied in full float32 (as torch's matmul does by default), not tf32."""
    PER: tl.constexpr = 32 // (2 if BITS == 3 else BITS)
    BW: tl.constexpr = BLOCK_K // PER
    if GROUPED:
        e = tl.program_id(2)
        lo = tl.load(offs_ptr + e)
        hi = tl.load(offs_ptr + e + 1)
        row = ROW0 + e.to(tl.int64)
        qa_ptr, qha_ptr, sa_ptr, sma_ptr, za_ptr, zma_ptr, qb_ptr, qhb_ptr, sb_ptr, smb_ptr, zb_ptr, zmb_ptr = _to_record(
            row, RS, GATED, qa_ptr, qha_ptr, sa_ptr, sma_ptr, za_ptr, zma_ptr, qb_ptr, qhb_ptr, sb_ptr, smb_ptr, zb_ptr, zmb_ptr)
    else:
        lo = 0
        hi = M
    m0 = lo + tl.program_id(0) * BLOCK_M  # the tile's first row
    rm = m0 + tl.arange(0, BLOCK_M)  # [BM]
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    r = rn[:, None]  # [BN, 1]
    m_ok = rm < hi  # an expert with fewer rows leaves the tail programs nothing to do
    acc_a = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    acc_b = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    if m0 < hi:  # (no tl.max: a jit function of its own, which interpreted kernels cannot call)
        for i in range(K_TILES):
            kw0 = i * BW
            cols = kw0 * PER + tl.arange(0, BLOCK_K)  # [BK]
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + cols[None, :],
                         mask=m_ok[:, None] & (cols[None, :] < K), other=0.0)  # [BM, BK]
            wa = _decode_tile(qa_ptr, qha_ptr, sa_ptr, sma_ptr, za_ptr, zma_ptr, r, kw0, N, K, x_ptr.dtype.element_ty,
                              MG, BITS, G, MB, BLOCK_N, BLOCK_K)
            if IEEE:
                acc_a = tl.dot(xt, tl.trans(wa), acc_a, input_precision="ieee")
            else:
                acc_a = tl.dot(xt, tl.trans(wa), acc_a)
            if GATED:
                wb = _decode_tile(qb_ptr, qhb_ptr, sb_ptr, smb_ptr, zb_ptr, zmb_ptr, r, kw0, N, K,
                                  x_ptr.dtype.element_ty, MG, BITS, G, MB, BLOCK_N, BLOCK_K)
                if IEEE:
                    acc_b = tl.dot(xt, tl.trans(wb), acc_b, input_precision="ieee")
                else:
                    acc_b = tl.dot(xt, tl.trans(wb), acc_b)
        y = acc_a
        if GATED:
            # silu(A x) * B x in float32; exp of -|a| cannot overflow
            ex = tl.exp(-tl.abs(acc_a))
            y = acc_a * tl.where(acc_a >= 0, 1.0 / (1.0 + ex), ex / (1.0 + ex)) * acc_b
        omask = m_ok[:, None] & (rn[None, :] < N)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=omask)
