"""The many-token path: dequantize a packed matrix once per call with a Triton kernel into a
reusable dense scratch buffer, then one dense matmul (tensor cores on the GPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from formats.errors import ConfigError
from formats.qtensor import QuantSpec

from .words import codes_per_word, high_plane_view, word_layout_ok, word_view

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
    """A 1-D buffer of at least `numel` elements reused across calls (grown, never shrunk)."""
    device = torch.device(device)
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
    from .triton_dequant import dequant_kernel, dequant_words_kernel  # triton only when a kernel runs

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
        per = codes_per_word(spec)
        grid = (_cdiv(n, DEQUANT_BLOCK_N), _cdiv(k // per, DEQUANT_BLOCK_W))
        dequant_words_kernel[grid](
            out, *words, s, sm, z, zm, n, k, out.stride(0),
            MG=mg, BITS=spec.bits, G=spec.group_size, META8=spec.meta_bits == 8,
            BLOCK_N=DEQUANT_BLOCK_N, BLOCK_W=DEQUANT_BLOCK_W,
            EVEN=n % DEQUANT_BLOCK_N == 0 and (k // per) % DEQUANT_BLOCK_W == 0, enable_fp_fusion=False,
        )
        return out
    grid = (_cdiv(n, DEQUANT_BLOCK_N), _cdiv(k, DEQUANT_BLOCK_K))
    dequant_kernel[grid](
        out, q, qh, s, sm, z, zm,
        n, k, q.shape[1], qh.shape[1], out.stride(0),
        MG=mg, BITS=spec.bits, G=spec.group_size, META8=spec.meta_bits == 8,
        BLOCK_N=DEQUANT_BLOCK_N, BLOCK_K=DEQUANT_BLOCK_K, enable_fp_fusion=False,
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


def prefill_matmul(x: torch.Tensor, comps: dict[str, torch.Tensor], shape: tuple[int, int],
                   spec: QuantSpec) -> torch.Tensor:
    """x [T, K] @ W.T -> [T, N] in x.dtype, W dequantized into the scratch buffer."""
    n, k = shape
    if not spec.quantized:
        return F.linear(x, comps["weight"].to(x.dtype))
    w = scratch(x.device, x.dtype, n * k).view(n, k)
    dequantize_into(comps, shape, spec, w)
    return F.linear(x, w)
