"""Triton kernel: fused dequantize-GEMM y[m, n] = sum_k x[m, k] * W[n, k] for many tokens
(prefill), decoding each tile of W in registers and multiplying it on the tensor cores.

Why: the prefill path otherwise writes every expert matrix densely (2 bytes per weight) into a
scratch buffer and reads it back in cuBLAS, 4 bytes of traffic per weight against the ~0.4 the
packed matrix holds. Here a program decodes a [BLOCK_N, BLOCK_K] tile of W exactly as
dequant_words_kernel does (same float32 arithmetic, rounded to x's dtype: the same weights the
dense path multiplies) and feeds it to tl.dot against a [BLOCK_M, BLOCK_K] tile of x. Each
program re-decodes its W tiles, so the win needs few M tiles per matrix: a prompt's tokens per
expert, not a batch of thousands.

Layouts: those of the word kernels (runtime/kernels/words.py): K % 32 == 0, groups of whole
words or words of whole groups.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_gemv import _load_meta


@triton.jit
def qgemm_kernel(
    x_ptr, out_ptr, q_ptr, qh_ptr, s_ptr, sm_ptr, z_ptr, zm_ptr,
    M, N, K, stride_xm, stride_om,
    MG: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, META8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr,
    IEEE: tl.constexpr = False,
):
    """Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)); x [M, K] and out [M, N] with unit column
    stride; BLOCK_K a multiple of the codes per word, K_TILES = cdiv(K, BLOCK_K) (a constant
    trip count: a runtime one breaks the Triton interpreter under numpy >= 2.4). IEEE: float32 x multiplied in full
    float32 (as torch's matmul does by default), not tf32."""
    BL: tl.constexpr = 2 if BITS == 3 else BITS
    PER: tl.constexpr = 32 // BL
    MASK: tl.constexpr = (1 << BL) - 1
    BW: tl.constexpr = BLOCK_K // PER  # words per row of a tile
    KW = K // PER
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    r = rn[:, None]  # [BN, 1]
    c = tl.arange(0, PER)[None, None, :]  # [1, 1, PER] code position in a word
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for i in range(K_TILES):
        kw0 = i * BW
        kw = (kw0 + tl.arange(0, BW))[None, :]  # [1, BW]
        m2 = (r < N) & (kw < KW)  # [BN, BW]
        words = tl.load(q_ptr + r * KW + kw, mask=m2, other=0)  # [BN, BW] int32
        q = (words[:, :, None] >> (c * BL)) & MASK  # [BN, BW, PER]
        if BITS == 3:
            hi = tl.load(qh_ptr + r * (K // 16) + kw, mask=m2, other=0).to(tl.int32)
            q = q | (((hi[:, :, None] >> c) & 1) << 2)
        if G % PER == 0:  # a word lies in one group
            gidx = r * (K // G) + (kw * PER) // G  # [BN, BW]
            s = _load_meta(s_ptr, sm_ptr, gidx, m2, META8, MG)[:, :, None]
            z = _load_meta(z_ptr, zm_ptr, gidx, m2, META8, MG)[:, :, None]
        else:  # several groups per word
            gidx = r[:, :, None] * (K // G) + (kw[:, :, None] * PER + c) // G  # [BN, BW, PER]
            m3 = m2[:, :, None]
            s = _load_meta(s_ptr, sm_ptr, gidx, m3, META8, MG)
            z = _load_meta(z_ptr, zm_ptr, gidx, m3, META8, MG)
        w = ((q.to(tl.float32) - z) * s).to(x_ptr.dtype.element_ty)  # [BN, BW, PER], as the dense path rounds
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))  # column kw * PER + c
        cols = kw0 * PER + tl.arange(0, BLOCK_K)  # [BK]
        xt = tl.load(x_ptr + rm[:, None] * stride_xm + cols[None, :],
                     mask=(rm[:, None] < M) & (cols[None, :] < K), other=0.0)  # [BM, BK]
        if IEEE:
            acc = tl.dot(xt, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, tl.trans(w), acc)
    omask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask)
