"""Triton kernel: fused dequantize-GEMV y[t, n] = sum_k x[t, k] * W[n, k] for a few tokens,
reading the packed planes as int32 words and never materialising W.

Layout (formats/qtensor.py, formats/packing.py): the low plane of width BL holds
PER = 32 // BL codes per little-endian word, code c at bits BL*c, so word w of row n holds
columns w*PER .. w*PER + PER - 1. 3-bit codes add a 1-bit plane, read as little-endian
16-bit half-words: half-word w holds bit 2 of the same columns (so it loads at the low
plane's word index, with no gather and no per-word shift).

A tile is [BLOCK_N rows, BKW words]; every tensor in the inner loop has that shape (plus a
leading token axis), so nothing is reshaped and nothing is reduced across lanes until the
program ends. Code c of every word (the loop over c is unrolled) becomes a float by the exponent trick without being shifted down: each
half-word of codes is OR-ed once into the bit pattern of 2**23; masking code b of it in
place (with the exponent bits) reads as the float 2**23 + q * 2**(BL*b), one subtraction
away from q * 2**(BL*b), and x is scaled by 2**-(BL*b) to match. That is one integer
instruction per weight (a LOP3) where shift-mask-or took three: the integer pipe, at half
the FP32 rate on sm_90, bound the kernel (tools/sass_stats.py). Int-to-float converts run
at a quarter of the FMA rate. Per group segment of a word the tile accumulates
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
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _ld(ptrs, mask, other, EVEN: tl.constexpr):
    """tl.load, unmasked when the launch covers the matrix exactly (EVEN): the predicates and
    their comparisons cost a few integer instructions per loaded element."""
    if EVEN:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mask, other=other)


@triton.jit
def _gather(ptrs, mask, other, EVEN: tl.constexpr, GATHER: tl.constexpr):
    """_ld of a tile whose addresses repeat along its words (each word reading its group's
    scale code, when a group spans words or two groups share a byte). GATHER (compiled for a
    GPU, the matrix covered exactly): as inline-asm loads, one per element. Triton 3.6 (the
    CUDA builds of torch 2.11) gives a plain load with such addresses a layout of its own, rows
    fastest across lanes, and then moves the accumulator through shared memory every tile to
    meet the words' layout: 4 barriers and 16 shared-memory accesses per iteration of the 2-bit
    loop on sm_90 (docs/BENCHMARKS.md section 35). Inline assembly anchors no layout, so it
    takes the words' one, as triton 3.9 gives the plain load."""
    if GATHER and EVEN:
        BITS: tl.constexpr = ptrs.dtype.element_ty.primitive_bitwidth
        addr = ptrs.to(tl.int64)
        if BITS == 8:
            return tl.inline_asm_elementwise("ld.global.nc.u8 $0, [$1];", "=r,l", [addr], dtype=tl.int32,
                                             is_pure=True, pack=1)
        elif BITS == 16:
            return tl.inline_asm_elementwise("ld.global.nc.b16 $0, [$1];", "=h,l", [addr], dtype=tl.int16,
                                             is_pure=True, pack=1).to(tl.float16, bitcast=True)
        else:
            return tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=f,l", [addr], dtype=tl.float32,
                                             is_pure=True, pack=1)
    else:
        return _ld(ptrs, mask, other, EVEN)


@triton.jit
def _meta_code(codes_ptr, gidx, gmask, MB: tl.constexpr, EVEN: tl.constexpr = False,
               GATHER: tl.constexpr = False):
    """The scale or zero code of groups `gidx` as float32: a byte (MB 8), or a nibble (MB 4:
    group 2j in the low half of byte j). GATHER: see _gather."""
    if MB == 4:
        byte = _gather(codes_ptr + (gidx >> 1), gmask, 0, EVEN, GATHER).to(tl.int32)
        return ((byte >> ((gidx & 1) * 4)) & 15).to(tl.float32)
    else:
        return _gather(codes_ptr + gidx, gmask, 0, EVEN, GATHER).to(tl.float32)


@triton.jit
def _load_meta(codes_ptr, meta_ptr, gidx, gmask, MB: tl.constexpr, MG: tl.constexpr, EVEN: tl.constexpr = False,
               GATHER: tl.constexpr = False):
    """Scales or zeros of groups `gidx` as float32: f16 values (MB 16), or 8- or 4-bit codes
    with a float32 (step, min) pair per MG consecutive groups. MG is a compile-time constant: a
    runtime divisor made `gidx // MG` a full integer division per loaded element (dozens of
    instructions); a constant one is a shift (powers of two) or a multiply-high. GATHER: see
    _gather."""
    if MB != 16:
        code = _meta_code(codes_ptr, gidx, gmask, MB, EVEN, GATHER)
        mi = gidx // MG
        step = _gather(meta_ptr + 2 * mi, gmask, 0.0, EVEN, GATHER)
        lo = _gather(meta_ptr + 2 * mi + 1, gmask, 0.0, EVEN, GATHER)
        return step * code + lo
    else:
        return _gather(codes_ptr + gidx, gmask, 0.0, EVEN, GATHER).to(tl.float32)


@triton.jit
def _row_meta(sm_ptr, zm_ptr, r, rmask, k0, K, G: tl.constexpr, MG: tl.constexpr, EVEN: tl.constexpr):
    """(step, min) of the scales and of the zeros of the tile rows r (rmask: inside the matrix),
    in r's shape, for ROW_META launches (the tile's groups of a row share one meta group):
    loaded once per row and tile. A tile past K (a split-K slice's last ones) loads zeros: its
    mi would be the next row's meta group, past the matrix for the last row, and a NaN read
    there times its masked codes' zeros is still NaN."""
    mi = (r * (K // G) + k0 // G) // MG
    rmask = rmask & (r * 0 + k0 < K)  # in r's shape: a scalar condition fails the interpreter's loads
    return (_ld(sm_ptr + 2 * mi, rmask, 0.0, EVEN), _ld(sm_ptr + 2 * mi + 1, rmask, 0.0, EVEN),
            _ld(zm_ptr + 2 * mi, rmask, 0.0, EVEN), _ld(zm_ptr + 2 * mi + 1, rmask, 0.0, EVEN))


@triton.jit
def _scale_zero(s_ptr, sm_ptr, z_ptr, zm_ptr, gidx, gmask, rm, MB: tl.constexpr, MG: tl.constexpr,
                EVEN: tl.constexpr, ROW_META: tl.constexpr, GATHER: tl.constexpr = False):
    """Scales and zeros of groups `gidx` as float32 in gidx's shape; ROW_META: from the codes
    and `rm`, the rows' (step, min) pairs that _row_meta loaded. GATHER: see _gather."""
    if ROW_META:
        s_step, s_min, z_step, z_min = rm
        s = s_step * _meta_code(s_ptr, gidx, gmask, MB, EVEN, GATHER) + s_min
        z = z_step * _meta_code(z_ptr, gidx, gmask, MB, EVEN, GATHER) + z_min
    else:
        s = _load_meta(s_ptr, sm_ptr, gidx, gmask, MB, MG, EVEN, GATHER)
        z = _load_meta(z_ptr, zm_ptr, gidx, gmask, MB, MG, EVEN, GATHER)
    return s, z


@triton.jit
def _tile_update(acc, x_ptr, stride_xt, q_ptr, qh_ptr, s_ptr, sm_ptr, z_ptr, zm_ptr,
                 rows, n_mask, k0, K, MG: tl.constexpr,
                 T: tl.constexpr, BT: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
                 MB: tl.constexpr, BLOCK_N: tl.constexpr, BKW: tl.constexpr, X_PERMUTED: tl.constexpr,
                 EVEN: tl.constexpr, ROW_META: tl.constexpr):
    """acc [BT, BLOCK_N, BKW] += the products of the BKW words starting at column k0 (EVEN: no
    row or column of the tile lies outside the matrix; ROW_META: 8-bit meta whose meta groups
    never split a tile row, so each row of a tile has one (step, min) pair per plane).

    The words load as [BN, BKW], unlike _tile_update_int's 3-D loads: the compiler then gives
    a thread several rows of one word column, which share one activation and its scaling (in
    3-D, a thread's 4 columns of one row took more float instructions per weight at 8 and 16
    tokens, and 3-bit codes spilled at 16)."""
    BL: tl.constexpr = 2 if BITS == 3 else BITS
    PER: tl.constexpr = 32 // BL
    MASK: tl.constexpr = (1 << BL) - 1
    GW: tl.constexpr = G if G < PER else PER  # codes of one word that share a group
    KW = K // PER  # words per row
    kw = k0 // PER + tl.arange(0, BKW)  # [BKW] word index in the row
    w_ok = kw < KW
    r = rows[:, None]  # [BN, 1]
    m2 = n_mask[:, None] & w_ok[None, :]  # [BN, BKW]
    words = _ld(q_ptr + r * KW + kw[None, :], m2, 0, EVEN)  # [BN, BKW] int32
    # Each half-word of codes OR-ed into the exponent of 2**23 (0x4B000000): see the loop below
    lower = (words & 0xFFFF) | 0x4B000000  # codes 0 .. PER/2-1
    upper = ((words >> 16) & 0xFFFF) | 0x4B000000  # codes PER/2 ..
    if BITS == 3:
        # int16 [N, K/16]: half-word w holds bit 2 of the codes of low-plane word w
        hi = _ld(qh_ptr + r * (K // 16) + kw[None, :], m2, 0, EVEN).to(tl.int32)
        hi = (hi & 0xFFFF) | 0x4B000000  # bit c = bit 2 of code c
    tt = tl.arange(0, BT)[:, None, None]  # [BT, 1, 1]
    x_rows = x_ptr + tt * stride_xt
    x_mask = (tt < T) & w_ok[None, None, :]  # [BT, 1, BKW]
    rm = 0
    if ROW_META:  # the tile's groups share one (step, min) pair per row: load it once per row
        rm = _row_meta(sm_ptr, zm_ptr, r, n_mask[:, None], k0, K, G, MG, EVEN)
    for j in tl.static_range(PER // GW):
        gidx = r * (K // G) + ((kw * PER + j * GW) // G)[None, :]  # [BN, BKW] row-major group index
        s, z = _scale_zero(s_ptr, sm_ptr, z_ptr, zm_ptr, gidx, m2, rm, MB, MG, EVEN, ROW_META)  # [BN, BKW]
        s, z = s[None, :, :], z[None, :, :]
        dot = tl.full([BT, BLOCK_N, BKW], 0.0, tl.float32)
        xs = tl.full([BT, 1, BKW], 0.0, tl.float32)
        for i in tl.static_range(GW):
            c = j * GW + i  # a constexpr: j and i come from static_range
            if X_PERMUTED:
                xo = c * KW + kw
            else:
                xo = kw * PER + c
            xv = _ld(x_rows + xo[None, None, :], x_mask, 0.0, EVEN and T == BT).to(tl.float32)  # [BT, 1, BKW]
            # Code c sits at bit BL*b of `lower` or `upper` (b = c mod PER/2, below bit 16). ANDing
            # the half-word, whose exponent bits already say 2**23, with the exponent mask and the
            # code's bit mask leaves the float 2**23 + q * 2**(BL*b) exactly: one LOP3 and one
            # subtraction per weight, no shift. x is scaled by 2**-(BL*b) instead (exact: a power
            # of two), once per activation, not per weight.
            bpos = c % (PER // 2)
            src = upper if c >= PER // 2 else lower
            qf = (src & (0x7F800000 | (MASK << (BL * bpos)))).to(tl.float32, bitcast=True) - 8388608.0
            dot += qf[None, :, :] * (xv * (1.0 / (1 << (BL * bpos))))
            if BITS == 3:  # bit 2 of code c, from the high plane the same way, weighted 4
                hf = (hi & (0x7F800000 | (1 << c))).to(tl.float32, bitcast=True) - 8388608.0
                dot += hf[None, :, :] * (xv * (4.0 / (1 << c)))
            xs += xv
        acc += s * (dot - z * xs)
    return acc


# Integer activations (INT_X): x quantized to int16 per word of codes (xquant_kernel), so a
# weight costs half a dp2a, the PTX instruction that multiplies two signed 16-bit values by
# two unsigned bytes and adds both products to an int32, plus a quarter of a shift and a
# quarter of a LOP3 that put four codes into the four bytes of a register. The float path
# above spends a LOP3, an FADD and an FFMA per weight; on sm_90 that issue rate, not HBM,
# bounded the kernels (tools/sass_stats.py). The int32 sum of a word converts to float once,
# times the word's activation scale.
#
# xquant_kernel writes, per token row, NP = PER/2 int32 pair rows then the float32 scales and
# sums, each KW = K/PER words long: [rows, NP + 2, KW]. With NS = 8 // BITS, byte j of
# (word >> BITS*s) & byte-mask holds code j*NS + s, so pair row p = 2s + h holds the
# activations of codes 2h*NS + s (low half) and (2h+1)*NS + s (high half): the ones that
# dp2a's lo (h 0) or hi (h 1) mode multiplies with that register.

@triton.jit
def _dp2a(xp, v, acc, HI: tl.constexpr, ASM: tl.constexpr):
    """acc + lo16(xp) * byte(v, 2 HI) + hi16(xp) * byte(v, 2 HI + 1), signed 16-bit times
    unsigned bytes: one dp2a where PTX runs (ASM), the same integer arithmetic elsewhere (the
    interpreter cannot run inline assembly; a CUDA test checks both agree bit for bit)."""
    if ASM:
        if HI:
            return tl.inline_asm_elementwise("dp2a.hi.s32.u32 $0, $1, $2, $3;", "=r,r,r,r", [xp, v, acc],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("dp2a.lo.s32.u32 $0, $1, $2, $3;", "=r,r,r,r", [xp, v, acc],
                                             dtype=tl.int32, is_pure=True, pack=1)
    else:
        b = v >> (16 * HI)
        return acc + ((xp << 16) >> 16) * (b & 0xFF) + (xp >> 16) * ((b >> 8) & 0xFF)


@triton.jit
def _tile_update_int(acc, x_ptr, stride_xt, q_ptr, qh_ptr, s_ptr, sm_ptr, z_ptr, zm_ptr,
                     rows, n_mask, k0, K, MG: tl.constexpr,
                     T: tl.constexpr, BT: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
                     MB: tl.constexpr, BLOCK_N: tl.constexpr, BKW: tl.constexpr,
                     EVEN: tl.constexpr, ROW_META: tl.constexpr, ASM: tl.constexpr):
    """_tile_update for int16 activations (xquant_kernel's layout) and 2-, 3-, 4- or 8-bit codes
    whose groups hold whole words (G % PER == 0): every word's codes share one scale and zero.
    3-bit codes read as 2-bit ones (their low plane's words, x in the 2-bit layout) with the
    high plane's bit OR-ed into each byte as the code's 4s: dp2a takes bytes up to 255."""
    BL: tl.constexpr = 2 if BITS == 3 else BITS  # bits per code in the low plane's words
    PER: tl.constexpr = 32 // BL
    NS: tl.constexpr = 8 // BL  # shifts that bring each code of a word to the bottom of a byte
    NP: tl.constexpr = PER // 2
    BMASK: tl.constexpr = ((1 << BL) - 1) * 0x01010101 if BL < 8 else 0  # 8 bits: the bytes are codes
    KW = K // PER
    # Every tensor here has the tile's 3-D shape, [1, BN, BKW] or [BT, 1, BKW], and every load
    # too: a 2-D load let the compiler pick a layout of its own (4 words a thread, vectorised)
    # and convert each shifted copy of the words into the tile's through shared memory.
    kw = (k0 // PER + tl.arange(0, BKW))[None, None, :]  # [1, 1, BKW]
    w_ok = kw < KW
    r = rows[None, :, None]  # [1, BN, 1]
    m3 = n_mask[None, :, None] & w_ok  # [1, BN, BKW]
    words = _ld(q_ptr + r * KW + kw, m3, 0, EVEN)  # [1, BN, BKW] int32
    hs = 0
    if BITS == 3:
        # half-word w of the high plane holds bit 2 of the codes of low-plane word w (bit c:
        # code c). Byte j of the s-th shift below holds code 4j + s, so nibble j (codes 4j ..
        # 4j+3) moves to bits 8j+2 .. 8j+5: shifted right by s, bit 8j+2 is code 4j+s's.
        hw = _ld(qh_ptr + r * KW + kw, m3, 0, EVEN).to(tl.int32) & 0xFFFF  # [1, BN, BKW]
        hs = ((hw & 0xF) << 2) | ((hw & 0xF0) << 6) | ((hw & 0xF00) << 10) | ((hw & 0xF000) << 14)
    tt = tl.arange(0, BT)[:, None, None]  # [BT, 1, 1]
    x_rows = x_ptr + tt * stride_xt + kw  # [BT, 1, BKW]
    x_mask = (tt < T) & w_ok
    XE: tl.constexpr = EVEN and T == BT
    idot = tl.full([BT, BLOCK_N, BKW], 0, tl.int32)
    for s in tl.static_range(NS):
        # the arithmetic shift's sign bits never reach a masked bit: BL * s + 8 * 3 + BL <= 32
        if BITS == 8:
            v = words
        elif BITS == 3:
            v = ((words >> (BL * s)) & BMASK) | ((hs >> s) & 0x04040404)
        else:
            v = (words >> (BL * s)) & BMASK
        for h in tl.static_range(2):
            xp = _ld(x_rows + (2 * s + h) * KW, x_mask, 0, XE)  # [BT, 1, BKW] int16 pairs
            idot = _dp2a(xp, v, idot, h, ASM)
    dx = _ld(x_rows + NP * KW, x_mask, 0, XE).to(tl.float32, bitcast=True)  # [BT, 1, BKW] word scales
    sx = _ld(x_rows + (NP + 1) * KW, x_mask, 0, XE).to(tl.float32, bitcast=True)  # sums of x per word
    # words per group, a constant: kw // 1 keeps the index contiguous, so the compiler loads
    # the codes of a thread's consecutive words at once (kw * PER // G would not)
    gidx = r * (K // G) + kw // (G // PER)  # [1, BN, BKW]
    rm = 0
    if ROW_META:
        rm = _row_meta(sm_ptr, zm_ptr, r, n_mask[None, :, None], k0, K, G, MG, EVEN)
    # One token: one code per word (8-bit codes, one word a group) loads contiguously, in the
    # words' layout under either triton; any other meta repeats along the tile (see _gather).
    # At several tokens the gather took more instructions than the layout conversion it saves
    # (2-bit w1+w3 at 4 tokens: 624 loop instructions against 379; tools/sass_stats.py).
    GATHER: tl.constexpr = ASM and BT == 1 and not (MB == 8 and G == PER and ROW_META)
    sc, ze = _scale_zero(s_ptr, sm_ptr, z_ptr, zm_ptr, gidx, m3, rm, MB, MG, EVEN, ROW_META, GATHER)  # [1, BN, BKW]
    # sum_c s (q_c - z) x_c = s (sum_c q_c x_c - z sum_c x_c), the first sum in integers
    acc += sc * (idot.to(tl.float32) * dx - ze * sx)
    return acc


@triton.jit
def _int16_pairs(a, b, AXIS: tl.constexpr):
    """The int16 format of words whose NP activation pairs lie along the last axis AXIS of a
    (low halves) and b (high halves): (the pairs as int32, round(x * 32767 / max|x|) in each
    half; the word's scale max|x| / 32767 and its exact sum, as float32 bit patterns, AXIS
    reduced). One definition for xquant_words and the gated GEMV's epilogue."""
    amax = tl.reduce(tl.maximum(tl.abs(a), tl.abs(b)), AXIS, _max)
    total = tl.reduce(a + b, AXIS, _add)
    inv = tl.where(amax > 0, 32767.0 / tl.where(amax > 0, amax, 1.0), 0.0)  # an all-zero word: codes 0
    inv = tl.expand_dims(inv, AXIS)
    qa = tl.floor(a * inv + 0.5).to(tl.int32)  # |q| <= 32767
    qb = tl.floor(b * inv + 0.5).to(tl.int32)
    return (qa & 0xFFFF) | (qb << 16), (amax / 32767.0).to(tl.int32, bitcast=True), total.to(tl.int32, bitcast=True)


@triton.jit
def xquant_kernel(x_ptr, out_ptr, K, stride_x, BITS: tl.constexpr, BW: tl.constexpr):
    """x [rows, K] (any float type) -> out [rows, NP + 2, K / PER] int32 (see the comment
    above _dp2a): per word of PER columns, round(x * 32767 / max|x|) as int16 pairs in dp2a
    order, then the scale max|x| / 32767 and the exact sum of x as float32 bit patterns.
    Grid (rows, cdiv(K / PER, BW))."""
    PER: tl.constexpr = 32 // BITS
    row = tl.program_id(0).to(tl.int64)
    KW = K // PER
    w = tl.program_id(1) * BW + tl.arange(0, BW)  # [BW]
    xquant_words(x_ptr + row * stride_x, out_ptr + row * ((PER // 2 + 2) * KW), KW, w, BITS)


@triton.jit
def xquant_words(src, dst, KW, w, BITS: tl.constexpr):
    """xquant_kernel's work for the words w [BW] of one row: src its x, dst its output row
    (also called by the decode step's fused norm, kernels/triton_decode.py)."""
    PER: tl.constexpr = 32 // BITS
    NS: tl.constexpr = 8 // BITS
    NP: tl.constexpr = PER // 2
    wm = (w < KW)[:, None]  # [BW, 1]
    p = tl.arange(0, NP)  # [NP]
    c0 = 2 * (p % 2) * NS + p // 2  # the code whose activation goes in the pair's low half
    src = src + w[:, None] * PER
    a = tl.load(src + c0[None, :], mask=wm, other=0.0).to(tl.float32)  # [BW, NP]
    b = tl.load(src + (c0 + NS)[None, :], mask=wm, other=0.0).to(tl.float32)
    pairs, scale, total = _int16_pairs(a, b, 1)  # [BW, NP], [BW], [BW]
    tl.store(dst + p[None, :] * KW + w[:, None], pairs, mask=wm)
    tl.store(dst + NP * KW + w, scale, mask=w < KW)
    tl.store(dst + (NP + 1) * KW + w, total, mask=w < KW)


@triton.jit
def _store_int_words(out_ptr, y, pid_n, N, T: tl.constexpr, BT: tl.constexpr, BLOCK_N: tl.constexpr, stride_ot,
                     PER: tl.constexpr):
    """y [BT, BLOCK_N] float32, rows pid_n * BLOCK_N .. of a [T, N] result, stored as
    xquant_words stores x for PER codes per word (its arithmetic, from float32 rather than
    from y rounded to the activation dtype): BLOCK_N / PER whole words per program."""
    NS: tl.constexpr = PER // 4  # PER = 4 NS: code c = j NS + s, j = 2 h + half (see _dp2a's comment)
    NP: tl.constexpr = PER // 2
    BW: tl.constexpr = BLOCK_N // PER
    KW = N // PER
    # pair row p = 2 s + h takes codes (2h) NS + s (low half) and (2h + 1) NS + s (high half)
    y5 = tl.permute(tl.reshape(y, [BT, BW, 2, 2, NS]), (0, 1, 4, 2, 3))  # [BT, BW, NS, h, half]
    lo, hi = tl.split(tl.reshape(y5, [BT, BW, NP, 2]))  # [BT, BW, NP] each
    pairs, scale, total = _int16_pairs(lo, hi, 2)  # [BT, BW, NP], [BT, BW], [BT, BW]
    t = tl.arange(0, BT)
    w = pid_n * BW + tl.arange(0, BW)
    tw = t[:, None] * stride_ot + w[None, :]  # [BT, BW]
    ok = (t[:, None] < T) & (w[None, :] < KW)
    p = tl.arange(0, NP)[None, None, :]
    tl.store(out_ptr + tw[:, :, None] + p * KW, pairs, mask=ok[:, :, None])
    tl.store(out_ptr + tw + NP * KW, scale, mask=ok)
    tl.store(out_ptr + tw + (NP + 1) * KW, total, mask=ok)


@triton.jit
def _row(ptr, row, RS):
    """ptr, an operand of the expert record in row 0 of a [rows, RS bytes] buffer, moved to
    the same operand of record `row` (int64: the buffer may span more than 2**31 bytes).
    Every operand's offset in a record is a multiple of its item size (FORMAT.md), and RS of
    4096 (record_size), so the element offset is exact."""
    ESIZE: tl.constexpr = ptr.dtype.element_ty.primitive_bitwidth // 8
    return ptr + row * (RS // ESIZE)


@triton.jit
def _to_record(row, RS, GATED: tl.constexpr, qa, qha, sa, sma, za, zma, qb, qhb, sb, smb, zb, zmb):
    """The six operand pointers of matrix A (and B when GATED) moved from record 0 to `row`."""
    qa, qha, sa, sma, za, zma = _row(qa, row, RS), _row(qha, row, RS), _row(sa, row, RS), _row(sma, row, RS), \
        _row(za, row, RS), _row(zma, row, RS)
    if GATED:
        qb, qhb, sb, smb, zb, zmb = _row(qb, row, RS), _row(qhb, row, RS), _row(sb, row, RS), _row(smb, row, RS), \
            _row(zb, row, RS), _row(zmb, row, RS)
    return qa, qha, sa, sma, za, zma, qb, qhb, sb, smb, zb, zmb


@triton.jit
def qgemv_kernel(
    x_ptr, out_ptr, out2_ptr,
    qa_ptr, qha_ptr, sa_ptr, sma_ptr, za_ptr, zma_ptr,
    qb_ptr, qhb_ptr, sb_ptr, smb_ptr, zb_ptr, zmb_ptr,
    sel_ptr, w_ptr,
    N, RS, stride_xt, stride_xe, stride_os, stride_oe, stride_ot,
    K: tl.constexpr, MG: tl.constexpr, TILES: tl.constexpr, T: tl.constexpr, BT: tl.constexpr, BITS: tl.constexpr,
    G: tl.constexpr,
    MB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, X_PERMUTED: tl.constexpr,
    GATED: tl.constexpr, PARTIAL: tl.constexpr, OUT_PER: tl.constexpr, EVEN: tl.constexpr = False,
    ROW_META: tl.constexpr = False, INDEXED: tl.constexpr = False, SCALED: tl.constexpr = False,
    INT_X: tl.constexpr = False, ASM: tl.constexpr = False, OUT_INT: tl.constexpr = 0,
):
    """Grid (cdiv(N, BLOCK_N), split), each program TILES tiles of BLOCK_K columns. Matrix A
    (and B when GATED, same shape and spec) times x [T, K] (X_PERMUTED: [T, PER, K/PER]).
    PARTIAL: write fp32 partial sums of this K slice to out[slice] (and B's to out2[slice]);
    else write A x (or silu(A x) * B x when GATED) to out [T, N], permuted for a consumer
    with OUT_PER codes per word when OUT_PER > 1 (out[t, (n % OUT_PER) * N/OUT_PER + n / OUT_PER]).

    INDEXED: a third grid axis over experts, the matrices of program e being those of record
    row sel[e] of a buffer of records RS bytes apart (the operand pointers are those of row 0),
    its input x + e * stride_xe and its output out + e * stride_oe: the experts of a token
    chosen on the device, with no host round trip to learn which (a whole decode step can then
    be one CUDA graph). SCALED (not PARTIAL): the result of program e times w[e], the router
    weight, which a linear consumer (w2) then carries into the expert's output.

    INT_X: x is xquant_kernel's output for this BITS (3-bit codes: for 2 bits; int16
    activations and dp2a, see _tile_update_int), ASM: with the dp2a instruction (compiled for a GPU).
    OUT_INT > 0 (not PARTIAL; BLOCK_N and N multiples of it): write the result as xquant_kernel
    would for a consumer with OUT_INT codes per word, into an int32 out [T, (OUT_INT/2 + 2) *
    N/OUT_INT] (stride_ot, stride_oe in int32s): each program holds whole words, so the gated
    w1/w3 hands w2 its int16 input without the quantizing launch in between.

    K, the row length, is a compile-time constant (a compile per matrix width): the distances
    between a thread's rows and between x's pair rows become immediate load offsets instead of
    an integer multiply-add per address (docs/BENCHMARKS.md section 21)."""
    BL: tl.constexpr = 2 if BITS == 3 else BITS
    BKW: tl.constexpr = BLOCK_K * BL // 32
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if INDEXED:
        pid_e = tl.program_id(2)
        row = tl.load(sel_ptr + pid_e).to(tl.int64)
        qa_ptr, qha_ptr, sa_ptr, sma_ptr, za_ptr, zma_ptr, qb_ptr, qhb_ptr, sb_ptr, smb_ptr, zb_ptr, zmb_ptr = _to_record(
            row, RS, GATED, qa_ptr, qha_ptr, sa_ptr, sma_ptr, za_ptr, zma_ptr, qb_ptr, qhb_ptr, sb_ptr, smb_ptr, zb_ptr, zmb_ptr)
        x_ptr += pid_e * stride_xe
        out_ptr += pid_e * stride_oe
        out2_ptr += pid_e * stride_oe
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rows < N
    acc_a = tl.full([BT, BLOCK_N, BKW], 0.0, tl.float32)
    acc_b = tl.full([BT, BLOCK_N, BKW], 0.0, tl.float32)
    k_start = pid_k * (TILES * BLOCK_K)
    # a constant trip count (the last slice may run masked tiles past K): loop bounds that
    # depend on program ids break the Triton interpreter under numpy >= 2.4
    for i in range(TILES):
        k0 = k_start + i * BLOCK_K
        if INT_X:
            acc_a = _tile_update_int(acc_a, x_ptr, stride_xt, qa_ptr, qha_ptr, sa_ptr, sma_ptr, za_ptr, zma_ptr,
                                     rows, n_mask, k0, K, MG, T, BT, BITS, G, MB, BLOCK_N, BKW, EVEN, ROW_META, ASM)
            if GATED:
                acc_b = _tile_update_int(acc_b, x_ptr, stride_xt, qb_ptr, qhb_ptr, sb_ptr, smb_ptr, zb_ptr, zmb_ptr,
                                         rows, n_mask, k0, K, MG, T, BT, BITS, G, MB, BLOCK_N, BKW, EVEN, ROW_META,
                                         ASM)
        else:
            acc_a = _tile_update(acc_a, x_ptr, stride_xt, qa_ptr, qha_ptr, sa_ptr, sma_ptr, za_ptr, zma_ptr,
                                 rows, n_mask, k0, K, MG, T, BT, BITS, G, MB, BLOCK_N, BKW, X_PERMUTED, EVEN,
                                 ROW_META)
            if GATED:
                acc_b = _tile_update(acc_b, x_ptr, stride_xt, qb_ptr, qhb_ptr, sb_ptr, smb_ptr, zb_ptr, zmb_ptr,
                                     rows, n_mask, k0, K, MG, T, BT, BITS, G, MB, BLOCK_N, BKW, X_PERMUTED, EVEN,
                                     ROW_META)

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
        if SCALED:
            y = y * tl.load(w_ptr + pid_e).to(tl.float32)
        if OUT_INT > 0:
            _store_int_words(out_ptr, y, pid_n, N, T, BT, BLOCK_N, stride_ot, OUT_INT)
        else:
            if OUT_PER > 1:
                cols = (rows % OUT_PER) * (N // OUT_PER) + rows // OUT_PER
            else:
                cols = rows
            tl.store(out_ptr + tix * stride_ot + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=omask)
