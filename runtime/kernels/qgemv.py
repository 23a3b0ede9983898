"""y = x @ W.T for a packed matrix W: the fused dequantize-GEMV for a few tokens, the
dequantize-into-scratch + dense matmul path for many, chosen by the token count."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F

from formats.errors import ConfigError, LayoutError
from formats.qtensor import QuantSpec

from .configs import DEFAULT_SM_COUNT, FP_FUSION, GemvConfig, pick_gemv_config
from .prefill import prefill_matmul
from .tuning import ensure_loaded
from .words import codes_per_word, operand_args, word_layout_ok

# The int16-activation kernels multiply with PTX's dp2a where they are compiled. False runs
# their integer emulation there too (the interpreter always does): test_cuda compares the two.
DP2A_ASM = True
# More tokens than this: dequantize once and use a dense matmul (tensor cores); the fused
# GEMV re-multiplies every unpacked weight per token on the CUDA cores.
PREFILL_THRESHOLD = 16
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


@lru_cache(maxsize=16)
def sm_count(device: torch.device) -> int:
    """The device's SM count (the config heuristic, and so the tuner's candidate set, depend on it)."""
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def gemv_supported(shape: tuple[int, int], spec: QuantSpec) -> bool:
    """Whether the fused GEMV handles this layout (see words.word_layout_ok); others take
    dequantize + matmul."""
    return word_layout_ok(shape, spec)


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised kernel outputs (one place, so tests can hand out poisoned buffers)."""
    return torch.empty(shape, dtype=dtype, device=device)


def permute_x(x: torch.Tensor, per: int) -> torch.Tensor:
    """x [T, K] -> [T, K] ordered (c, w): xp[t, c * K/per + w] = x[t, w * per + c]."""
    t, k = x.shape
    s0, s1 = x.stride()
    # the transposed [T, per, K/per] view in one call, then the copy (view + transpose cost
    # a torch call more of host time)
    return x.as_strided((t, per, k // per), (s0, s1, per * s1)).reshape(t, k)


def unpermute_x(xp: torch.Tensor, per: int) -> torch.Tensor:
    t, k = xp.shape
    s0, s1 = xp.stride()
    return xp.as_strided((t, k // per, per), (s0, s1, k // per * s1)).reshape(t, k)


def _check(x: torch.Tensor, comps: dict[str, torch.Tensor], shape: tuple[int, int], spec: QuantSpec) -> None:
    if x.shape[-1] != shape[1]:
        raise LayoutError(f"activations of shape {list(x.shape)} do not match a [{shape[0]}, {shape[1]}] "
                          f"matrix ({spec.describe()}): the last dimension must be {shape[1]}")
    if x.dtype not in ACT_DTYPES:
        raise ConfigError(f"activations of dtype {x.dtype} are not supported by the fused kernels",
                          hint="use float16, bfloat16 or float32 activations")
    ref = next(iter(comps.values()))
    if ref.device != x.device:
        raise ConfigError(f"packed matrix on {ref.device} but activations on {x.device}",
                          hint="move the record to the compute device before calling the kernels")


@dataclass(frozen=True)
class GemvLaunch:
    """Everything about one qgemv_kernel launch that follows from the matrix shape, spec,
    token count and config (not from the tensors): computed once per such key (_launch_plan)
    instead of per call, where its Python (config arithmetic, dataclasses.replace) cost more
    host time than the launch."""

    n: int
    k: int
    gated: bool
    per: int  # codes per word of the matrix: the x permutation period
    permute: bool  # x arrives unpermuted and the config reads it permuted
    unpermute: bool  # x arrives permuted and the config reads it in order
    partial: bool  # split-K: fp32 partials [split, T, N] summed after the launch
    out_shape: tuple[int, ...]
    out_per: int  # permute the result for a consumer with this many codes per word
    out_int: int  # > 0: the result as quantize_x(y, out_int) writes it (int32), for an int_x consumer
    grid: tuple[int, ...]
    ints: tuple[int]  # n (the scalar before the record stride)
    tail: tuple[int, int, int]  # the output strides: per K slice, per expert, per token
    experts: int  # > 0: an indexed launch over this many experts (see run_gemv)
    int_x: bool  # x goes through quantize_x first (int16 activations, dp2a)
    # the keyword arguments of the launch (constexprs, warps, stages); read-only by convention
    kwargs: dict = field(hash=False, compare=False)


@lru_cache(maxsize=1024)
def _launch_plan(n: int, k: int, t: int, spec: QuantSpec, gated: bool, config: GemvConfig,
                 x_permuted: bool, out_per: int, experts: int = 0, out_int: int = 0) -> GemvLaunch:
    cfg = config.for_matrix(k, spec)
    per = codes_per_word(spec)
    tiles = _cdiv(_cdiv(k, cfg.block_k), cfg.split_k)  # per K slice
    split = _cdiv(k, tiles * cfg.block_k)
    # an indexed w2 (not gated) sums its experts' outputs afterwards: in fp32, as partials
    partial = split > 1 or (experts > 0 and not gated)
    e = max(experts, 1)
    if out_per > 1 and n % out_per:
        raise LayoutError(f"cannot permute a {n}-row result for {out_per} codes per word")
    # a request: granted where every program holds whole words of the consumer's layout
    out_int = out_int if gated and not partial and out_int > 1 and cfg.block_n % out_int == 0 and \
        n % out_int == 0 else 0
    if out_int:
        out_per = 1
    row = (out_int // 2 + 2) * (n // out_int) if out_int else n  # a token's output row, in items
    constexprs = dict(
        K=k, MG=max(spec.meta_group_size, 1), TILES=tiles, T=t, BT=_next_pow2(t), BITS=spec.bits, G=spec.group_size, MB=spec.meta_bits,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, X_PERMUTED=cfg.permute_x,
        GATED=gated, PARTIAL=partial, OUT_PER=1 if partial else out_per, OUT_INT=out_int,
        EVEN=n % cfg.block_n == 0 and split * tiles * cfg.block_k == k,
        ROW_META=row_meta(k, spec, cfg.block_k), INDEXED=experts > 0, SCALED=experts > 0 and gated and not partial,
        INT_X=cfg.int_x, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **FP_FUSION,
    )
    return GemvLaunch(
        n=n, k=k, gated=gated, per=per, permute=cfg.permute_x and not x_permuted,
        unpermute=x_permuted and not cfg.permute_x, partial=partial,
        out_shape=((split,) if partial else ()) + ((experts,) if experts else ()) + (t, row), out_per=out_per,
        out_int=out_int, grid=(_cdiv(n, cfg.block_n), split) + ((experts,) if experts else ()), ints=(n,),
        tail=(e * t * row, t * row, row), experts=experts, int_x=cfg.int_x, kwargs=constexprs,
    )


def row_meta(k: int, spec: QuantSpec, block_k: int) -> bool:
    """Whether every tile row lies inside one meta group (4- or 8-bit meta), so the kernel loads
    (step, min) once per row and tile instead of per word: tiles hold whole groups
    (BLOCK_K % G == 0), rows whole tiles (K % BLOCK_K == 0), so every tile starts at a multiple
    of BLOCK_K / G groups in the flat group index, and meta groups are made of whole tiles
    (MG % (BLOCK_K / G) == 0)."""
    g = spec.group_size
    return spec.coded_meta and block_k % g == 0 and k % block_k == 0 and spec.meta_group_size % (block_k // g) == 0


def launch_plan(x: torch.Tensor, shape: tuple[int, int], spec: QuantSpec, gated: bool,
                config: GemvConfig | None = None, *, x_permuted: bool = False, out_per: int = 1,
                experts: int = 0, out_int: int = 0) -> GemvLaunch:
    """The launch of x [T, K] (indexed: [T, K] or [experts, T, K]) times a supported `shape`
    matrix (two with `gated`): keyed by values only (shape, spec, T, config, experts), never
    by tensors, so it cannot go stale. out_int > 1 asks a gated launch to write its result as
    an int_x consumer with that many codes per word reads it; the plan's out_int says whether
    the config allows it (0: written in x's dtype, out_per as asked)."""
    n, k = shape
    t = x.shape[-2]
    if config is None:  # not cached: the TUNED table may change at run time
        if x.is_cuda:
            ensure_loaded(x.device)  # this GPU's tuning cache, once per device (a dict lookup after)
        config = pick_gemv_config(n, k, t, spec, gated, sm_count(x.device))
    return _launch_plan(n, k, t, spec, gated, config, x_permuted, out_per, experts, out_int)


@dataclass(frozen=True)
class Index:
    """Which records an indexed launch multiplies (see run_gemv): `sel` [E] int64 row numbers
    of a buffer of records `rs` bytes apart, on the device (chosen there: no host sync), and
    `w` [E] their router weights; the operand arguments are those of the buffer's row 0."""

    sel: torch.Tensor
    w: torch.Tensor
    rs: int


@dataclass(frozen=True)
class XFormat:
    """How a launch reads x when it is not x as given: permuted (permute_x order for PER codes
    per word) or int16-quantized (quantize_x's layout for PER). A producer that writes x in
    this format as well (kernels.decode_ops.add_rms_norm) saves the launch that converts it."""

    per: int
    int_x: bool  # False: permuted


def x_format(plan: GemvLaunch) -> XFormat | None:
    """The format `plan` converts a plain x [T, K] into before its launch, or None (read as is)."""
    if plan.int_x:
        return XFormat(plan.per, True)
    if plan.permute:
        return XFormat(plan.per, False)
    return None


def prepared_ok(prepared: torch.Tensor, plan: GemvLaunch, rows: int) -> bool:
    """Whether `prepared` has the shape and dtype of x_format(plan)'s conversion of x [rows, K]."""
    fmt = x_format(plan)
    if fmt is None:
        return False
    if fmt.int_x:
        shape, dtype_ok = (rows, (fmt.per // 2 + 2) * (plan.k // fmt.per)), prepared.dtype == torch.int32
    else:
        shape, dtype_ok = (rows, plan.k), prepared.dtype.is_floating_point
    return dtype_ok and tuple(prepared.shape) == shape and prepared.is_contiguous()


def quantize_x(x: torch.Tensor, per: int) -> torch.Tensor:
    """x [R, K] (contiguous rows) -> [R, (PER/2 + 2) * K/PER] int32: the int16 activations,
    word scales and word sums the INT_X kernel reads for a matrix of PER codes per word
    (triton_gemv.xquant_kernel; one launch)."""
    from . import triton_gemv

    r, k = x.shape
    kw = k // per
    out = _alloc((r, per // 2 + 2, kw), torch.int32, x.device)
    bw = min(128, _next_pow2(kw))
    triton_gemv.xquant_kernel[(r, _cdiv(kw, bw))](x, out, k, x.stride(0), BITS=32 // per, BW=bw, **FP_FUSION)
    return out.view(r, -1)


def run_gemv(x: torch.Tensor | None, args: list[tuple], plan: GemvLaunch, index: Index | None = None,
             keep_partials: bool = False, prepared: torch.Tensor | None = None,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """Launch qgemv_kernel for x [T, K] and the kernel arguments of one matrix (two when
    gated, see words.operand_args) as `plan` says; the result as gemv describes it.

    Indexed (plan.experts = E, `index` given), for the E experts of one token chosen on the
    device: gated, x [T, K] is shared and the result is [E, T, N], expert e's
    silu(A x) * B x times w[e]; not gated, x is [E, T, K] (one input per expert) and the
    result [T, N] is the sum over the experts.

    keep_partials (not gated): return a split or indexed launch's float32 partials [P, T, N]
    unsummed, for a consumer that sums them itself (kernels.decode_ops): two launches fewer.

    prepared: x already in x_format(plan) (written by its producer), used instead of
    converting x [T, K] here; it must match (prepared_ok). x None: `prepared` alone, shaped
    [..., row] with x's leading dimensions (an out_int launch's result), and `dtype` the
    activations' (the result's).

    out_int plans (gated, not indexed or indexed) return the int32 rows an int_x consumer
    reads, [T, row] or [E, T, row], in place of [T, N] or [E, T, N]."""
    from . import triton_gemv  # triton is imported only when a kernel runs

    if x is None:
        lead = prepared.shape[:-1]
        prepared = prepared.reshape(-1, prepared.shape[-1])
        rows = prepared.shape[0]
    else:
        lead, dtype = x.shape[:-1], x.dtype
        if x.dim() == 3:  # [E, T, K]: the permutation works per row
            x = x.reshape(-1, x.shape[-1])
        rows = x.shape[0]
    if prepared is not None:
        if not prepared_ok(prepared, plan, rows):  # a producer wrote another launch's format
            raise ConfigError(f"prepared activations {list(prepared.shape)} {prepared.dtype} do not match the "
                              f"launch's input format {x_format(plan)} for {rows} rows of {plan.k}")
        x = prepared
    else:
        if plan.permute:
            x = permute_x(x, plan.per)
        elif plan.unpermute:
            x = unpermute_x(x, plan.per)
        x = x.contiguous()
        if plan.int_x:
            x = quantize_x(x, plan.per)
    if plan.partial:
        out = _alloc(plan.out_shape, torch.float32, x.device)
        out2 = _alloc(plan.out_shape, torch.float32, x.device) if plan.gated else out
    else:
        out = out2 = _alloc(plan.out_shape, torch.int32 if plan.out_int else dtype, x.device)
    b = args[1] if plan.gated else args[0]
    if index is None:
        sel, w, rs, stride_xe = x, x, 0, 0  # unused pointers: any tensor
    else:
        sel, w, rs = index.sel, index.w, index.rs
        stride_xe = 0 if len(lead) == 1 else lead[-1] * x.stride(0)
    # ASM: the dp2a instruction where the kernel is compiled (the interpreter runs its emulation)
    triton_gemv.qgemv_kernel[plan.grid](x, out, out2, *args[0], *b, sel, w, *plan.ints, rs, x.stride(0), stride_xe,
                                        *plan.tail, ASM=x.is_cuda and DP2A_ASM, **plan.kwargs)
    if not plan.partial:
        return out
    if keep_partials and not plan.gated:
        return out.view(-1, *plan.out_shape[-2:])  # [P, T, N]: every K slice (of every expert)
    if plan.experts and not plan.gated:
        return out.sum((0, 1)).to(dtype)  # [T, N]: every slice of every expert
    y = out.sum(0)  # [T, N] float32 ([E, T, N] indexed)
    if plan.gated:
        y = F.silu(y) * out2.sum(0)
        if plan.experts:
            y = y * index.w.view(-1, 1, 1)
    y = y.to(dtype)
    if plan.out_per > 1:
        y = permute_x(y.reshape(-1, y.shape[-1]), plan.out_per).view(y.shape)
    return y


def gemv(x: torch.Tensor, mats: list[dict[str, torch.Tensor]], shape: tuple[int, int], spec: QuantSpec,
         config: GemvConfig | None = None, *, x_permuted: bool = False, out_per: int = 1,
         keep_partials: bool = False, prepared: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [T, K] times one matrix (-> [T, N]) or, with two matrices (w1, w3 of one expert),
    silu(x @ A.T) * (x @ B.T) -> [T, N]; in x.dtype. None when the layout needs the fallback.

    x_permuted: x is already in permute_x order for this spec. out_per > 1: return the
    result in permute_x order for a consumer with that many codes per word (the w2 after a
    gated w1/w3), which saves that consumer a copy."""
    if not gemv_supported(shape, spec):
        return None
    args = [operand_args(c) for c in mats]
    if any(a is None for a in args):
        return None
    plan = launch_plan(x, shape, spec, len(mats) == 2, config, x_permuted=x_permuted, out_per=out_per)
    return run_gemv(x, args, plan, keep_partials=keep_partials, prepared=prepared)


def qmatmul(x: torch.Tensor, comps: dict[str, torch.Tensor], shape: tuple[int, int], spec: QuantSpec, *,
            config: GemvConfig | None = None, prefill_threshold: int = PREFILL_THRESHOLD,
            keep_partials: bool = False, prepared: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T for x [..., K] (float16/bfloat16/float32) and a packed W [N, K] given as
    its component tensors (runtime.dequant.component_tensors) -> [..., N] in x.dtype.

    Up to `prefill_threshold` tokens run the fused GEMV (`config` overrides its launch
    parameters); more tokens, or a layout the GEMV does not cover, dequantize into a scratch
    buffer with a Triton kernel and use a dense matmul.

    keep_partials (x [T, K] only): a split-K GEMV's float32 partials [P, T, N] come back
    unsummed (run_gemv); other paths return [T, N] as usual. prepared: see run_gemv."""
    _check(x, comps, shape, spec)
    n, k = shape
    flat = x.dim() == 2  # the common case: skip the two reshapes (a torch call each)
    lead = x.shape[:-1]
    x2 = x if flat else x.reshape(-1, k)
    t = x2.shape[0]
    if t == 0:
        return x.new_empty((*lead, n))
    y = None
    if spec.quantized and t <= prefill_threshold:
        y = gemv(x2, [comps], shape, spec, config, keep_partials=keep_partials and flat,
                 prepared=prepared if flat else None)
    if y is None:
        y = prefill_matmul(x2.contiguous(), comps, shape, spec)
    return y if flat else y.view(*lead, n)
