"""The many-token path: dequantize a packed matrix once per call with a Triton kernel into a
reusable dense scratch buffer, then one dense matmul (tensor cores on the GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from formats.errors import ConfigError
from formats.qtensor import QuantSpec

from .configs import FP_FUSION
from .words import codes_per_word, high_plane_view, operand_args, word_layout_ok, word_view

# Tile of the byte-wise dequantize kernel: 4096 weights per program, rows of 256 contiguous
# outputs (512-byte fp16 stores per row).
DEQUANT_BLOCK_N = 16
DEQUANT_BLOCK_K = 256
# Words per row of a tile of the word-wise kernel (16 rows x 32 words: 8192 weights at 2 bits)
DEQUANT_BLOCK_W = 32

# One buffer per (device, dtype, stream): kernels on one stream run in order, so the next
# matrix may overwrite the buffer as soon as the previous matmul is queued; two streams
# sharing it would race.
_SCRATCH: dict[tuple, torch.Tensor] = {}


def _stream_key(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def scratch(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A 1-D buffer of at least `numel` elements reused across calls (grown, never shrunk).

    During a CUDA graph capture a plain allocation from the capturing graph's pool instead:
    a cached buffer allocated there would be freed into that pool when it grows (or on
    release_scratch) while the graph still writes it on every replay, and the next capture
    into the pool could be handed the same memory."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.empty(numel, dtype=dtype, device=device)
    key = (device, dtype, _stream_key(device))
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        _SCRATCH.pop(key, None)  # free the old one before allocating the larger one
        buf = torch.empty(numel, dtype=dtype, device=device)
        _SCRATCH[key] = buf
    return buf[:numel]


def release_scratch() -> None:
    """Drop every scratch buffer (e.g. before measuring memory or after a long prompt)."""
    _SCRATCH.clear()


def dequantize_into(comps: dict[str, torch.Tensor], shape: tuple[int, int], spec: QuantSpec,
                    out: torch.Tensor) -> torch.Tensor:
    """Write W [N, K] of a packed matrix into `out` ([N, K], unit column stride, fp16/bf16/fp32)."""
    from .triton_dequant import dequant_kernel  # triton only when a kernel runs

    n, k = shape
    if not spec.quantized:
        return out.copy_(comps["weight"])
    if tuple(out.shape) != (n, k) or out.stride(1) != 1:
        raise ConfigError(f"dequantize_into: output must be a [{n}, {k}] tensor with unit column stride, "
                          f"got shape {list(out.shape)} strides {list(out.stride())}")
    if out.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ConfigError(f"dequantize_into: output dtype {out.dtype} is not float16, bfloat16 or float32")
    q = comps["q"]
    qh = comps.get("q_hi", q)
    s, z = comps["scale"], comps["zero"]
    sm, zm = comps.get("scale_meta", s), comps.get("zero_meta", z)
    mg = max(spec.meta_group_size, 1)
    # no fused multiply-add in either kernel: the same roundings as formats.qtensor.decode_matrix,
    # so prefill sees bit-exact weights on every device (the kernels are bound by their stores)
    words = _words(q, qh, shape, spec)
    if words is not None:
        return dequantize_words_into((*words, s, sm, z, zm), shape, spec, out)
    grid = (_cdiv(n, DEQUANT_BLOCK_N), _cdiv(k, DEQUANT_BLOCK_K))
    dequant_kernel[grid](
        out, q, qh, s, sm, z, zm,
        n, k, q.shape[1], qh.shape[1], out.stride(0),
        MG=mg, BITS=spec.bits, G=spec.group_size, MB=spec.meta_bits,
        BLOCK_N=DEQUANT_BLOCK_N, BLOCK_K=DEQUANT_BLOCK_K, enable_fp_fusion=False,
    )
    return out


@dataclass(frozen=True)
class Group:
    """Experts for one dequantize launch: record rows row0 .. row0 + experts - 1 of a buffer of
    records `rs` bytes apart (the operands given are those of its row 0), expert e skipped
    when offsets[e] == offsets[e + 1] (offsets: a device tensor, [experts + 1] or longer)."""

    offsets: torch.Tensor
    row0: int
    rs: int
    experts: int


def dequantize_words_into(args: tuple, shape: tuple[int, int], spec: QuantSpec, out: torch.Tensor,
                          mats: int = 1, delta: int = 0, group: Group | None = None) -> torch.Tensor:
    """The word-wise kernel's launch: W [N, K] of the six operands `args` (words.operand_args)
    into out [mats * N, K] (unit column stride, rows N apart). mats > 1: that many matrices of
    this shape and spec whose operands lie `delta` bytes apart (a multiple of 4), stacked in
    out. group: the same for each of group.experts records (out [experts * mats * N, K]).
    The caller checks word_layout_ok and the output."""
    from .triton_dequant import dequant_words_kernel  # triton only when a kernel runs

    n, k = shape
    per = codes_per_word(spec)
    experts = 1 if group is None else group.experts
    grid = (_cdiv(n, DEQUANT_BLOCK_N), _cdiv(k // per, DEQUANT_BLOCK_W), experts * mats)
    dequant_words_kernel[grid](
        out, *args, args[0] if group is None else group.offsets, n, k, out.stride(0), delta,
        0 if group is None else group.row0, 0 if group is None else group.rs,
        MG=max(spec.meta_group_size, 1), BITS=spec.bits, G=spec.group_size, MB=spec.meta_bits,
        BLOCK_N=DEQUANT_BLOCK_N, BLOCK_W=DEQUANT_BLOCK_W,
        EVEN=n % DEQUANT_BLOCK_N == 0 and (k // per) % DEQUANT_BLOCK_W == 0, MATS=mats, GROUPED=group is not None,
        enable_fp_fusion=False,
    )
    return out


def _words(q: torch.Tensor, qh: torch.Tensor, shape: tuple[int, int], spec: QuantSpec) -> tuple | None:
    """The low and high planes as int32 words for dequant_words_kernel, or None when the layout
    needs the byte-wise kernel."""
    if not word_layout_ok(shape, spec):
        return None
    lo = word_view(q)
    hi = high_plane_view(qh) if spec.bits == 3 else lo
    return None if lo is None or hi is None else (lo, hi)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dequantize_triton(comps: dict[str, torch.Tensor], shape: tuple[int, int], spec: QuantSpec,
                      dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in `dtype` in a fresh tensor (same values as runtime.dequant.dequantize)."""
    ref = comps["q"] if spec.quantized else comps["weight"]
    return dequantize_into(comps, shape, spec, torch.empty(shape, dtype=dtype, device=ref.device))


# Which many-token path prefill_matmul takes: "dequant" (W into the scratch buffer, then a dense
# matmul) or "fused" (triton_gemm: W decoded tile by tile in registers, never written). The
# fused kernel reads ~10x fewer bytes per weight but re-decodes W per tile of tokens; it stays
# opt-in until the H100 says which wins (tools/kernel_bench.py times both).
PREFILL_ENV = "MOEPACK_PREFILL"
PREFILL_MODES = ("dequant", "fused")
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of the fused GEMM: 64 is a multiple of every width's codes per word
GEMM_CONFIG = (64, 64, 64, 4, 2)


def prefill_mode() -> str:
    mode = os.environ.get(PREFILL_ENV, "") or "dequant"
    if mode not in PREFILL_MODES:
        raise ConfigError(f"{PREFILL_ENV}={mode!r} is not one of {', '.join(PREFILL_MODES)}",
                          hint=f"unset {PREFILL_ENV}, or set it to dequant or fused")
    return mode


def fused_gemm(x: torch.Tensor, comps: dict[str, torch.Tensor], shape: tuple[int, int], spec: QuantSpec,
               config: tuple[int, int, int, int, int] = GEMM_CONFIG) -> torch.Tensor | None:
    """x [T, K] @ W.T -> [T, N] in x.dtype by the fused dequantize-GEMM, or None for a layout
    the word kernels do not cover."""
    from .triton_gemm import qgemm_kernel  # triton only when a kernel runs

    n, k = shape
    bm, bn, bk = config[:3]
    if not spec.quantized or not word_layout_ok(shape, spec) or bk % codes_per_word(spec):
        return None
    args = operand_args(comps)
    if args is None or x.dim() != 2 or x.stride(1) != 1:
        return None
    t = x.shape[0]
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    qgemm_kernel[(_cdiv(t, bm), _cdiv(n, bn))](
        x, out, *args, *args, x, 0, 0, t, n, k, x.stride(0), out.stride(0),
        **gemm_constexprs(shape, spec, x.dtype, config),
    )
    return out


def gemm_constexprs(shape: tuple[int, int], spec: QuantSpec, dtype: torch.dtype,
                    config: tuple[int, int, int, int, int] = GEMM_CONFIG) -> dict:
    """qgemm_kernel's compile-time arguments for a [N, K] matrix of `spec` and x of `dtype`."""
    bm, bn, bk, warps, stages = config
    return dict(MG=max(spec.meta_group_size, 1), BITS=spec.bits, G=spec.group_size, MB=spec.meta_bits,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, K_TILES=_cdiv(shape[1], bk), IEEE=dtype == torch.float32,
                num_warps=warps, num_stages=stages, **FP_FUSION)


def prefill_matmul(x: torch.Tensor, comps: dict[str, torch.Tensor], shape: tuple[int, int],
                   spec: QuantSpec) -> torch.Tensor:
    """x [T, K] @ W.T -> [T, N] in x.dtype: W dequantized into the scratch buffer and a dense
    matmul, or (MOEPACK_PREFILL=fused) the fused dequantize-GEMM."""
    n, k = shape
    if not spec.quantized:
        return F.linear(x, comps["weight"].to(x.dtype))
    if prefill_mode() == "fused":
        y = fused_gemm(x, comps, shape, spec)
        if y is not None:
            return y
    w = scratch(x.device, x.dtype, n * k).view(n, k)
    dequantize_into(comps, shape, spec, w)
    return F.linear(x, w)
