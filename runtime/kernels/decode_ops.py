"""The small operations of a decode step in one launch each (kernels/triton_decode.py): a
residual add with RMSNorm and the router's top-k, and rotary with the KV cache write.

Both take a GEMV's output as it comes (`y`): [T, N] in the model dtype, or the float32
partials of a split-K or per-expert launch, [P, T, N], which they sum first (so the GEMV's
own sum and cast launches go too; qgemv.run_gemv's keep_partials)."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from formats.errors import ConfigError

from .configs import FP_FUSION
from .qgemv import XFormat

# Above this many hidden units a token no longer fits one program's registers comfortably.
MAX_HIDDEN = 16384
MAX_EXPERTS = 64


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _rows(y: torch.Tensor | None, t: int, n: int) -> tuple[torch.Tensor | None, int, int]:
    """(y as contiguous rows, P, the stride between partial rows) for a GEMV output y."""
    if y is None:
        return None, 0, 0
    if y.dim() == 2:
        y = y[None]
    if tuple(y.shape[1:]) != (t, n):
        raise ConfigError(f"GEMV output of shape {list(y.shape)} does not match [P, {t}, {n}]")
    y = y.contiguous()
    return y, y.shape[0], t * n


def _format_buffer(x: torch.Tensor, fmt: XFormat) -> torch.Tensor:
    """Where a kernel writes x [T, K] in the GEMV input format `fmt` as well (K whole words)."""
    t, k = x.shape
    if fmt.int_x:  # quantize_x's layout
        return torch.empty((t, (fmt.per // 2 + 2) * (k // fmt.per)), dtype=torch.int32, device=x.device)
    return torch.empty_like(x)


def _format_consts(fmt: XFormat | None) -> dict:
    """The FMT and PER constexprs of norm_kernel and attend_combine_kernel for `fmt`."""
    return dict(FMT=0 if fmt is None else 2 if fmt.int_x else 1, PER=1 if fmt is None else fmt.per)


def norm_supported(hidden: int, experts: int = 0) -> bool:
    return hidden <= MAX_HIDDEN and experts <= MAX_EXPERTS


class Normed(NamedTuple):
    h: torch.Tensor  # [T, H] the residual stream after the add
    x: torch.Tensor  # [T, H] its norm
    topk_idx: torch.Tensor | None  # [T, k] int64 (with a router)
    topk_w: torch.Tensor | None  # [T, k] in the dtype
    prepared: torch.Tensor | None  # x in the GEMV input format asked for (qgemv.run_gemv's prepared)


def add_rms_norm(h: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 router: torch.Tensor | None = None, top_k: int = 0, fmt: XFormat | None = None) -> Normed:
    """h [T, H] (the residual stream, model dtype), y the GEMV output to add to it first (None:
    nothing) -> h' = h + y and x = weight * RMSNorm(h') as runtime.rmsnorm computes it; with
    `router` [E, H], also the top-k as runtime.moe.route gives it for x; with `fmt`, x also
    in that GEMV input format (qgemv.x_format of the consumer's launch). One launch."""
    from .triton_decode import norm_kernel  # triton only when a kernel runs

    t, hid = h.shape
    h = h.contiguous()
    y, p, stride_p = _rows(y, t, hid)
    h_out = torch.empty_like(h) if p else h
    x = torch.empty_like(h)
    e = 0 if router is None else router.shape[0]
    idx = tw = xf = None
    if router is not None:
        idx = torch.empty((t, top_k), dtype=torch.long, device=h.device)
        tw = torch.empty((t, top_k), dtype=h.dtype, device=h.device)
    if fmt is not None:
        if hid % fmt.per:
            raise ConfigError(f"a hidden size of {hid} is not a whole number of {fmt.per}-code words")
        xf = _format_buffer(x, fmt)
    bh = _next_pow2(hid)
    norm_kernel[(t,)](h, h if y is None else y, h_out, weight, x, x if router is None else router.contiguous(),
                      x if idx is None else idx, x if tw is None else tw, x if xf is None else xf, hid, stride_p, eps,
                      P=p, BH=bh, E=e, BE=_next_pow2(max(e, 2)), TOPK=top_k, BK=_next_pow2(max(top_k, 2)),
                      **_format_consts(fmt),
                      BW=1 if fmt is None else min(256, bh // fmt.per),
                      num_warps=8 if bh >= 4096 else 4, **FP_FUSION)
    return Normed(h_out, x, idx, tw, xf)


def rotary_supported(head_dim: int) -> bool:
    return head_dim >= 2 and head_dim & (head_dim - 1) == 0


def rotary_into_cache(y: torch.Tensor, heads: int, kv_heads: int, head_dim: int, cos: torch.Tensor,
                      sin_signed: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """One token's stacked q/k/v projection y ([1, (heads + 2 kv_heads) * D] or its partials)
    -> q [1, heads * D] rotated; k (rotated) and v written into `cache` [2, kv_heads, ctx, D]
    at the device position pos [1] (int64; the caller checked pos < ctx). cos, sin_signed:
    runtime.rope.Rotary's tables [ctx, D]. One launch, as Rotary.apply and KVCache.write_at."""
    from .triton_decode import rotary_kernel

    n = (heads + 2 * kv_heads) * head_dim
    y, p, stride_p = _rows(y, 1, n)
    q = torch.empty((1, heads * head_dim), dtype=cache.dtype, device=cache.device)
    rotary_kernel[(heads + 2 * kv_heads,)](y, q, cache, cos, sin_signed, pos, stride_p, cache.shape[2],
                                           NQ=heads, NK=kv_heads, D=head_dim, P=p, num_warps=1, **FP_FUSION)
    return q


# "0" keeps torch's scaled_dot_product_attention in the fused decode step (A/B timing of attend)
ATTEND_ENV = "MOEPACK_FLASH_DECODE"
ATTEND_BLOCK = 32  # keys per inner step of a split
MAX_GROUP = 16  # query heads per kv head: tl.dot's 16 rows


def _attend_takes(head_dim: int, n_rep: int) -> bool:
    return 16 <= head_dim <= 256 and rotary_supported(head_dim) and n_rep <= MAX_GROUP


def attend_supported(head_dim: int, n_rep: int) -> bool:
    return os.environ.get(ATTEND_ENV, "1") != "0" and _attend_takes(head_dim, n_rep)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def attend_splits(keys: int, kv_heads: int, device: torch.device) -> int:
    """How many splits share a token's keys out: about two programs per SM, and no more than
    a cache of `keys` positions has blocks. The kernels size each split from the position on
    the device (whole ATTEND_BLOCKs), so every step spreads its own keys over all of them."""
    want = max(1, 2 * _sm_count(device) // kv_heads)
    return max(1, min(want, -(-keys // ATTEND_BLOCK)))


def attend(q: torch.Tensor, cache: torch.Tensor, pos: torch.Tensor, keys: int, window: int | None,
           fmt: XFormat | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token's attention (flash-decoding): q [1, heads * D] (rotated) over the cache
    [2, kv_heads, ctx, D] positions that the token at the device position pos [1] sees
    (positions <= pos, and > pos - window with a sliding window), pos < keys <= ctx (the
    caller's bound: the device position is not read back). The seen keys are shared out over
    about two programs per SM, in shares sized on the device from pos: the cost follows the
    position, not `keys`, so one graph over the whole cache serves every step. -> (out
    [1, heads * D] in the model dtype, out in `fmt` or None). Two launches; softmax scale
    1/sqrt(D), as torch's attention."""
    from .triton_decode import attend_combine_kernel, attend_split_kernel

    _, g, ctx, d = cache.shape
    heads = q.shape[1] // d
    r = heads // g
    if keys > ctx or heads % g or q.shape != (1, heads * d):
        raise ConfigError(f"attend: q {list(q.shape)} and cache {list(cache.shape)} with {keys} keys do not fit")
    if not _attend_takes(d, r):
        # a query row past tl.dot's 16 would be left out, and the combine read scratch never written
        raise ConfigError(f"attend: {r} query heads per kv head of {d} (at most {MAX_GROUP}, a power of two 16-256)",
                          hint="attend_supported says which shapes take this kernel")
    s = attend_splits(keys, g, cache.device)
    ml = torch.empty((g, s, 2, r), dtype=torch.float32, device=cache.device)
    acc = torch.empty((g, s, r, d), dtype=torch.float32, device=cache.device)
    w = 0 if window is None else int(window)
    attend_split_kernel[(g, s)](q, cache, pos, ml, acc, ctx, w, d ** -0.5, R=r, RP=MAX_GROUP, D=d, G=g,
                                BN=ATTEND_BLOCK, WINDOW=window is not None, num_warps=4, **FP_FUSION)
    out = torch.empty((1, heads * d), dtype=cache.dtype, device=cache.device)
    xf = None
    if fmt is not None:
        if d % fmt.per:
            raise ConfigError(f"a head of {d} is not a whole number of {fmt.per}-code words")
        xf = _format_buffer(out, fmt)
    attend_combine_kernel[(heads,)](ml, acc, pos, out, out if xf is None else xf, w, s, R=r, D=d, G=g, BS=16,
                                    BN=ATTEND_BLOCK, WINDOW=window is not None, **_format_consts(fmt), num_warps=4, **FP_FUSION)
    return out, xf
