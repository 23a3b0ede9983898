"""Triton kernel: dequantize a packed matrix into a dense [N, K] buffer (fp16/bf16/fp32) in
one pass, for the prefill path (dense matmul on tensor cores afterwards).

Byte loads per element handle every layout (any K, any group size): the kernel is bound by
its 2-byte-per-weight writes, so the repeated byte and scale loads (served by L1) cost little.
Arithmetic matches formats.qtensor.decode_matrix: W = (q - z) * s in float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_gemv import _load_meta


@triton.jit
def dequant_kernel(
    out_ptr, q_ptr, qh_ptr, s_ptr, sm_ptr, z_ptr, zm_ptr,
    N, K, RB_LO, RB_HI, MG, stride_on,
    BITS: tl.constexpr, G: tl.constexpr, META8: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K)); RB_LO / RB_HI: bytes per row of each plane."""
    BL: tl.constexpr = 2 if BITS == 3 else BITS
    PER_BYTE: tl.constexpr = 8 // BL
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]  # [BN, 1]
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]  # [1, BK]
    m = (rows < N) & (cols < K)
    byte = tl.load(q_ptr + rows * RB_LO + cols // PER_BYTE, mask=m, other=0).to(tl.int32)
    q = (byte >> ((cols % PER_BYTE) * BL)) & ((1 << BL) - 1)
    if BITS == 3:
        hb = tl.load(qh_ptr + rows * RB_HI + cols // 8, mask=m, other=0).to(tl.int32)
        q = q | (((hb >> (cols % 8)) & 1) << 2)
    gidx = rows * (K // G) + cols // G
    s = _load_meta(s_ptr, sm_ptr, gidx, m, META8, MG)
    z = _load_meta(z_ptr, zm_ptr, gidx, m, META8, MG)
    w = (q.to(tl.float32) - z) * s
    tl.store(out_ptr + rows * stride_on + cols, w.to(out_ptr.dtype.element_ty), mask=m)
