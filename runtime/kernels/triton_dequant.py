"""Triton kernel: dequantize a packed matrix into a dense [N, K] buffer (fp16/bf16/fp32) in
one pass, for the prefill path (dense matmul on tensor cores afterwards).

Byte loads per element handle every layout (any K, any group size): the kernel is bound by
its 2-byte-per-weight writes, so the repeated byte and scale loads (served by L1) cost little.
Arithmetic matches formats.qtensor.decode_matrix: W = (q - z) * s in float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_gemv import _ld, _load_meta, _row


@triton.jit
def dequant_kernel(
    out_ptr, q_ptr, qh_ptr, s_ptr, sm_ptr, z_ptr, zm_ptr,
    N, K, RB_LO, RB_HI, stride_on,
    MG: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, MB: tl.constexpr,
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
    s = _load_meta(s_ptr, sm_ptr, gidx, m, MB, MG)
    z = _load_meta(z_ptr, zm_ptr, gidx, m, MB, MG)
    w = (q.to(tl.float32) - z) * s
    tl.store(out_ptr + rows * stride_on + cols, w.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _decode_words(q_ptr, qh_ptr, s_ptr, sm_ptr, z_ptr, zm_ptr, r, kw, N, K,
                  MG: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, MB: tl.constexpr, EVEN: tl.constexpr):
    """W at rows r [BN, 1] and low-plane words kw [1, BW] as float32 [BN, BW, PER] (code c of
    word kw is column kw * PER + c), with decode_matrix's arithmetic; zeros outside the matrix.
    Shared by dequant_words_kernel and the fused GEMM (triton_gemm.py)."""
    BL: tl.constexpr = 2 if BITS == 3 else BITS
    PER: tl.constexpr = 32 // BL
    MASK: tl.constexpr = (1 << BL) - 1
    KW = K // PER  # words per row of the low plane
    m2 = (r < N) & (kw < KW)  # [BN, BW]
    words = _ld(q_ptr + r * KW + kw, m2, 0, EVEN)  # [BN, BW] int32
    c = tl.arange(0, PER)[None, None, :]  # [1, 1, PER] code position in the word
    q = (words[:, :, None] >> (c * BL)) & MASK  # [BN, BW, PER]; the mask drops sign bits
    if BITS == 3:
        # int16 [N, K/16]: half-word w holds bit 2 of the codes of low-plane word w
        hi = _ld(qh_ptr + r * (K // 16) + kw, m2, 0, EVEN).to(tl.int32)
        q = q | (((hi[:, :, None] >> c) & 1) << 2)
    if G % PER == 0:  # a word lies in one group: one scale and zero per word
        gidx = r * (K // G) + (kw * PER) // G  # [BN, BW]
        s = _load_meta(s_ptr, sm_ptr, gidx, m2, MB, MG, EVEN)[:, :, None]
        z = _load_meta(z_ptr, zm_ptr, gidx, m2, MB, MG, EVEN)[:, :, None]
    else:  # several groups per word (PER % G == 0)
        gidx = r[:, :, None] * (K // G) + (kw[:, :, None] * PER + c) // G  # [BN, BW, PER]
        m3 = m2[:, :, None]
        s = _load_meta(s_ptr, sm_ptr, gidx, m3, MB, MG, EVEN)
        z = _load_meta(z_ptr, zm_ptr, gidx, m3, MB, MG, EVEN)
    return (q.to(tl.float32) - z) * s


@triton.jit
def _moved(ptr, row, RS, m, DELTA):
    """An operand pointer of matrix 0 of record 0 moved to matrix m of record `row`."""
    return _row(_row(ptr, row, RS), m, DELTA)


@triton.jit
def dequant_words_kernel(
    out_ptr, q_ptr, qh_ptr, s_ptr, sm_ptr, z_ptr, zm_ptr, offs_ptr,
    N, K, stride_on, DELTA, ROW0, RS,
    MG: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, MB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, EVEN: tl.constexpr = False,
    MATS: tl.constexpr = 1, GROUPED: tl.constexpr = False,
):
    """The same weights as dequant_kernel for the layouts the fused GEMV covers (K % 32 == 0,
    groups made of whole words or words made of whole groups, planes as int32 words).

    Grid (cdiv(N, BLOCK_N), cdiv(K / PER, BLOCK_W), experts * MATS). A tile is [BLOCK_N
    rows, BLOCK_W words, PER codes]: one 4-byte load per PER weights instead of one byte load
    per weight, and scales and zeros loaded once per word when a group spans whole words (per
    weight in dequant_kernel, each with an integer division by the meta group size). The
    innermost axis is PER contiguous outputs, so each thread stores a short vector. EVEN: the
    grid covers the matrix exactly, so no load or store needs a mask.

    The third axis, program p = e * MATS + m, runs matrix m of expert e, written to rows
    p * N .. p * N + N - 1 of out:
    - MATS matrices of one shape and spec lie DELTA bytes apart (an expert's w1 and w3 in its
      record: every operand of matrix m is DELTA * m bytes past matrix 0's);
    - GROUPED: expert e is record row ROW0 + e of a buffer of records RS bytes apart (the
      operand pointers are those of row 0), and is skipped when offs[e] == offs[e + 1]: a
      layer's experts in one launch, those no token chose left undecoded. Else one expert,
      the operands' own."""
    PER: tl.constexpr = 32 // (2 if BITS == 3 else BITS)
    p = tl.program_id(2)
    m = (p % MATS).to(tl.int64)
    if GROUPED:
        e = p // MATS
        lo = tl.load(offs_ptr + e)
        hi = tl.load(offs_ptr + e + 1)
        row = ROW0 + e.to(tl.int64)
    else:
        lo = 0
        hi = 1
        row = 0
    if lo < hi:  # (no early return: the interpreter and the compiler agree on this form)
        q_ptr, qh_ptr, s_ptr = _moved(q_ptr, row, RS, m, DELTA), _moved(qh_ptr, row, RS, m, DELTA), \
            _moved(s_ptr, row, RS, m, DELTA)
        sm_ptr, z_ptr, zm_ptr = _moved(sm_ptr, row, RS, m, DELTA), _moved(z_ptr, row, RS, m, DELTA), \
            _moved(zm_ptr, row, RS, m, DELTA)
        out_ptr += p.to(tl.int64) * N * stride_on
        r = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N))[:, None]  # [BN, 1]
        kw = (tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W))[None, :]  # [1, BW]
        w = _decode_words(q_ptr, qh_ptr, s_ptr, sm_ptr, z_ptr, zm_ptr, r, kw, N, K, MG, BITS, G, MB, EVEN)
        cols = kw[:, :, None] * PER + tl.arange(0, PER)[None, None, :]  # [1, BW, PER]
        if EVEN:
            tl.store(out_ptr + r[:, :, None] * stride_on + cols, w.to(out_ptr.dtype.element_ty))
        else:
            m3 = ((r < N) & (kw < K // PER))[:, :, None]
            tl.store(out_ptr + r[:, :, None] * stride_on + cols, w.to(out_ptr.dtype.element_ty), mask=m3)
