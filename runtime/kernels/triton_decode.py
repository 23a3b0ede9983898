"""Triton kernels for the small operations between a decode step's GEMVs (runtime.kernels.decode_ops).

With every GEMV fused, a Mixtral layer's decode step was still ~48 kernel launches, ~30 of
them torch's small ops: RMSNorm alone is 7 (convert, square, mean, add, rsqrt, multiply,
convert, multiply), rotary 4, the router 6, each split-K sum 2. In a CUDA graph each costs
a few microseconds of launch latency and tail, which section 8 of docs/BENCHMARKS.md put at
~0.15 ms of a 0.405 ms layer. These two kernels do that work in two launches per layer
half (attention in, attention out):

    norm_kernel    (partials of the last GEMV summed) + residual, RMSNorm, router top-k
    rotary_kernel  (partials of the q/k/v GEMV summed), rotary on q and k, k and v into the cache

Every rounding step is torch's (runtime.rmsnorm, runtime.rope, runtime.moe.route): values
are rounded to the model dtype exactly where torch's ops round them, so results match the
unfused path up to float32 summation order.
"""

from __future__ import annotations

import triton
import triton.language as tl

# tl.reduce with these, not tl.sum / tl.max / tl.argmax / tl.zeros: see triton_gemv's note
# (interpreted kernels cannot call triton's own @jit helpers when triton came in first)
from .triton_gemv import _add, _max, xquant_words


@triton.jit
def _min(a, b):
    return tl.minimum(a, b)


@triton.jit
def _sum_rows(y_ptr, offs, mask, stride_p, P: tl.constexpr):
    """sum over p < P of y[p * stride_p + offs] in float32 (the split-K / per-expert partials
    of a GEMV, or P = 1: its plain output)."""
    acc = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for p in tl.static_range(1, P):
        acc += tl.load(y_ptr + p * stride_p + offs, mask=mask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def norm_kernel(h_ptr, y_ptr, hout_ptr, w_ptr, out_ptr, r_ptr, idx_ptr, tw_ptr, xf_ptr, H, stride_p, eps,
                P: tl.constexpr, BH: tl.constexpr, E: tl.constexpr, BE: tl.constexpr, TOPK: tl.constexpr,
                BK: tl.constexpr, FMT: tl.constexpr = 0, PER: tl.constexpr = 1, BW: tl.constexpr = 1):
    """One token (program) of: h' = h + (sum of P rows of y, rounded to the dtype) (P > 0; h'
    written to hout), x = w * RMSNorm(h') (written to out), and with E > 0 the router:
    softmax over the E logits x . r[e] (rounded to the dtype, as a dtype linear layer gives
    them), the TOPK largest, renormalised (idx int64, tw in the dtype).

    FMT: x also written to xf in the format its GEMV reads (qgemv.XFormat), saving that
    conversion's launch: 1 permuted for PER codes per word, 2 int16-quantized (xquant_words,
    BW words at a time, read back from out)."""
    t = tl.program_id(0)
    dt = out_ptr.dtype.element_ty
    offs = tl.arange(0, BH)
    m = offs < H
    h = tl.load(h_ptr + t * H + offs, mask=m, other=0.0)
    if P > 0:
        y = _sum_rows(y_ptr + t * H, offs, m, stride_p, P).to(dt)
        h = (h.to(tl.float32) + y.to(tl.float32)).to(dt)  # one rounding, as a dtype add
        tl.store(hout_ptr + t * H + offs, h, mask=m)
    hf = h.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.reduce(hf * hf, 0, _add) / H + eps)
    xn = (hf * inv).to(dt)
    w = tl.load(w_ptr + offs, mask=m, other=0.0)
    x = (w.to(tl.float32) * xn.to(tl.float32)).to(dt)
    tl.store(out_ptr + t * H + offs, x, mask=m)
    if FMT == 1:  # qgemv.permute_x: xp[c * H/PER + w] = x[w * PER + c]
        tl.store(xf_ptr + t * H + (offs % PER) * (H // PER) + offs // PER, x, mask=m)
    if FMT == 2:
        tl.debug_barrier()  # this program's stores of x above are visible to all its threads
        KW = H // PER
        for w0 in tl.static_range(0, BH // PER, BW):  # words past KW are masked
            xquant_words(out_ptr + t * H, xf_ptr + t * ((PER // 2 + 2) * KW), KW, w0 + tl.arange(0, BW), 32 // PER)
    if E > 0:
        xf = x.to(tl.float32)
        eo = tl.arange(0, BE)
        logits = tl.full([BE], float("-inf"), tl.float32)
        for e in tl.static_range(E):
            r = tl.load(r_ptr + e * H + offs, mask=m, other=0.0).to(tl.float32)
            le = tl.reduce(xf * r, 0, _add).to(dt).to(tl.float32)
            logits = tl.where(eo == e, le, logits)
        p = tl.exp(logits - tl.reduce(logits, 0, _max))
        p = p / tl.reduce(p, 0, _add)  # softmax in float32 (padding lanes: exp(-inf) = 0)
        ko = tl.arange(0, BK)
        vals = tl.full([BK], 0.0, tl.float32)
        idxs = tl.full([BK], 0, tl.int64)
        left = tl.where(eo < E, p, -1.0)
        for j in tl.static_range(TOPK):
            top = tl.reduce(left, 0, _max)
            i = tl.reduce(tl.where(left == top, eo, BE), 0, _min)  # the first of equal maxima, as torch.topk
            vals = tl.where(ko == j, top, vals)
            idxs = tl.where(ko == j, i.to(tl.int64), idxs)
            left = tl.where(eo == i, -2.0, left)
        km = ko < TOPK
        vals = vals / tl.reduce(tl.where(km, vals, 0.0), 0, _add)
        tl.store(idx_ptr + t * TOPK + ko, idxs, mask=km)
        tl.store(tw_ptr + t * TOPK + ko, vals.to(dt), mask=km)


@triton.jit
def rotary_kernel(y_ptr, q_ptr, cache_ptr, cos_ptr, sin_ptr, pos_ptr, stride_p, ctx,
                  NQ: tl.constexpr, NK: tl.constexpr, D: tl.constexpr, P: tl.constexpr):
    """One head (program) of one token's stacked q/k/v projection y ([NQ + 2 NK] heads of D,
    P rows of partials summed and rounded to the dtype): q heads rotated into q, k heads
    rotated into cache[0, head, pos], v heads copied into cache[1, head, pos]. Rotation as
    runtime.rope.Rotary.apply: x * cos + roll(x, D/2) * sin_signed, each product and the
    sum rounded to the dtype."""
    hd = tl.program_id(0)
    dt = q_ptr.dtype.element_ty
    d = tl.arange(0, D)
    pos = tl.load(pos_ptr)
    x = _sum_rows(y_ptr + hd * D, d, d < D, stride_p, P).to(dt)
    if hd < NQ + NK:
        xr = _sum_rows(y_ptr + hd * D, (d + D // 2) % D, d < D, stride_p, P).to(dt)  # roll by D/2
        c = tl.load(cos_ptr + pos * D + d).to(tl.float32)
        s = tl.load(sin_ptr + pos * D + d).to(tl.float32)
        a = (x.to(tl.float32) * c).to(dt)
        b = (xr.to(tl.float32) * s).to(dt)
        x = (a.to(tl.float32) + b.to(tl.float32)).to(dt)
    if hd < NQ:
        tl.store(q_ptr + hd * D + d, x)
    else:
        # cache [2, NK, ctx, D]: k head g is row g, v head g row NK + g, i.e. row hd - NQ both
        tl.store(cache_ptr + ((hd - NQ).to(tl.int64) * ctx + pos) * D + d, x)


@triton.jit
def _seen_splits(pos, window, S, BN: tl.constexpr, WINDOW: tl.constexpr):
    """(first, base, kps): the first key the token at `pos` sees, the block-aligned key that
    split 0 starts at, and the keys per split (whole blocks) that share the base .. pos keys
    out among the S splits. From the position on the device: one graph serves every step."""
    first = 0
    if WINDOW:
        first = tl.maximum(pos - window + 1, 0)  # keys j > pos - window (transformers' overlay)
    base = first // BN * BN
    kps = ((pos + 1 - base + S - 1) // S + BN - 1) // BN * BN
    return first, base, kps


@triton.jit
def attend_split_kernel(q_ptr, cache_ptr, pos_ptr, ml_ptr, acc_ptr, ctx, window, scale,
                        R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                        BN: tl.constexpr, WINDOW: tl.constexpr):
    """One split (program (g, s)) of one token's attention for the R query heads of kv head g
    over its share of the keys the token at `pos` sees (_seen_splits): its running max m and
    sum l of exp(score - m) per query head (ml [G, S, 2, R]) and its unnormalised output
    (acc [G, S, R, D], float32). The share follows the position, so every step keeps the S
    programs busy on its keys alone; a split left without keys returns at once and writes
    nothing (attend_combine_kernel does not read it)."""
    g = tl.program_id(0)
    s = tl.program_id(1)
    S = tl.num_programs(1)
    dt = q_ptr.dtype.element_ty
    pos = tl.load(pos_ptr).to(tl.int32)
    first, base, kps = _seen_splits(pos, window, S, BN, WINDOW)
    start = tl.maximum(base + s * kps, first)
    stop = tl.minimum(base + s * kps + kps, pos + 1)
    if start < stop:
        r = tl.arange(0, RP)
        d = tl.arange(0, D)
        # rows past R are zeros: tl.dot wants 16 rows, a kv head has R (4 in Mixtral) queries
        q = tl.load(q_ptr + (g * R + r)[:, None] * D + d[None, :], mask=(r < R)[:, None], other=0.0)  # [RP, D]
        m = tl.full([RP], float("-inf"), tl.float32)
        l = tl.full([RP], 0.0, tl.float32)
        acc = tl.full([RP, D], 0.0, tl.float32)
        k_base = cache_ptr + g.to(tl.int64) * ctx * D  # cache [2, G, ctx, D]: keys, then values
        v_base = cache_ptr + (G + g).to(tl.int64) * ctx * D  # (64-bit: 2 G ctx D may pass 2^31)
        for j0 in range(start, stop, BN):  # the first key of every block is seen: m stays finite
            j = j0 + tl.arange(0, BN)
            ok = j < stop
            k = tl.load(k_base + j[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)  # [BN, D]
            v = tl.load(v_base + j[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
            if dt == tl.float32:
                sc = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(k))
            sc = tl.where(ok[None, :], sc * scale, float("-inf"))  # [RP, BN]
            m_new = tl.maximum(m, tl.reduce(sc, 1, _max))
            alpha = tl.exp(m - m_new)
            p = tl.exp(sc - m_new[:, None])
            l = l * alpha + tl.reduce(p, 1, _add)
            # the probabilities meet V in the model dtype, as torch's attention kernels do
            if dt == tl.float32:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(dt), v)
            acc = acc * alpha[:, None] + pv
            m = m_new
        row = (g * S + s) * R + r  # [RP]
        tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=(r < R)[:, None])
        tl.store(ml_ptr + ((g * S + s) * 2) * R + r, m, mask=r < R)
        tl.store(ml_ptr + ((g * S + s) * 2 + 1) * R + r, l, mask=r < R)


@triton.jit
def attend_combine_kernel(ml_ptr, acc_ptr, pos_ptr, out_ptr, xf_ptr, window, S,
                          R: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr,
                          WINDOW: tl.constexpr, FMT: tl.constexpr = 0, PER: tl.constexpr = 1):
    """One query head (program h) of attend_split_kernel's splits combined: out[h * D ..] =
    sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s over the splits that had keys (0 ..
    s_last, each with at least one), in the model dtype. FMT as norm_kernel's: the o
    projection's GEMV input written as well."""
    h = tl.program_id(0)
    g = h // R
    r = h % R
    dt = out_ptr.dtype.element_ty
    pos = tl.load(pos_ptr).to(tl.int32)
    _, base, kps = _seen_splits(pos, window, S, BN, WINDOW)
    s_last = (pos - base) // kps
    d = tl.arange(0, D)
    M = tl.full([1], float("-inf"), tl.float32)
    L = tl.full([1], 0.0, tl.float32)
    O = tl.full([D], 0.0, tl.float32)
    for s0 in range(0, s_last + 1, BS):
        s = s0 + tl.arange(0, BS)
        ok = s <= s_last
        at = (g * S + s) * 2 * R + r
        m = tl.load(ml_ptr + at, mask=ok, other=float("-inf"))  # [BS]
        l = tl.load(ml_ptr + at + R, mask=ok, other=0.0)
        a = tl.load(acc_ptr + ((g * S + s) * R + r)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        M_new = tl.maximum(M, tl.reduce(m, 0, _max))  # [1]: the first block holds a split seen
        f = tl.exp(m - M_new)  # [BS]; 0 where masked
        c = tl.exp(M - M_new)
        L = L * c + tl.reduce(l * f, 0, _add)
        O = O * c + tl.reduce(a * f[:, None], 0, _add)
        M = M_new
    x = (O / L).to(dt)
    offs = h * D + d
    tl.store(out_ptr + offs, x)
    H = tl.num_programs(0) * D
    if FMT == 1:  # qgemv.permute_x, as norm_kernel
        tl.store(xf_ptr + (offs % PER) * (H // PER) + offs // PER, x)
    if FMT == 2:
        tl.debug_barrier()  # this program's stores of x above are visible to all its threads
        xquant_words(out_ptr, xf_ptr, H // PER, h * (D // PER) + tl.arange(0, D // PER), 32 // PER)
