"""Dequantization of packed matrices in plain torch: the runtime's twin of
formats.qtensor.decode_matrix, bit-exact with it in float32 and vectorised so it runs on
any device (the fused kernels replace it on CUDA later; this stays the reference path).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from formats.errors import LayoutError
from formats.packing import plane_widths
from formats.qtensor import QuantSpec, matrix_layout

TORCH_DTYPES = {"u8": torch.uint8, "f16": torch.float16, "f32": torch.float32}
ITEMSIZE = {"u8": 1, "f16": 2, "f32": 4}


@lru_cache(maxsize=1024)
def _component_plan(shape: tuple[int, ...], spec: QuantSpec) -> tuple[tuple, int]:
    """Per component (name, torch dtype, itemsize, byte offset, shape, contiguous strides),
    and the bytes the matrix spans: everything about its views but the buffer, once per
    (shape, spec) (pure values; nothing here refers to a tensor)."""
    comps, end = matrix_layout(shape, spec)
    plan = []
    for c in comps:
        strides, step = [], 1
        for d in reversed(c.shape):
            strides.append(step)
            step *= d
        plan.append((c.name, TORCH_DTYPES[c.dtype], ITEMSIZE[c.dtype], c.offset, tuple(c.shape), tuple(reversed(strides))))
    return tuple(plan), end


def row_prefix_ok(rows: int, k: int, spec: QuantSpec) -> bool:
    """Whether the first `rows` rows of a [N, k] matrix in `spec` are, component by component,
    the components of a [rows, k] matrix (each component is row-major: bit planes [rows,
    bytes], scales and zeros in row-major group order), so the matrix splits between rows
    and rows + 1 into two matrices of the same spec: its groups end at a row's end, no 4/8-bit
    meta group straddles the cut, and the cut falls on a whole meta byte."""
    if not spec.quantized:
        return True
    if k % spec.group_size:
        return False
    if not spec.coded_meta:
        return True
    groups = rows * k // spec.group_size
    return groups % spec.meta_group_size == 0 and groups * spec.meta_bits % 8 == 0


@lru_cache(maxsize=1024)
def component_bytes(shape: tuple[int, int], spec: QuantSpec) -> dict[str, int]:
    """Bytes of each component of a `shape` matrix (for a row prefix, with row_prefix_ok: the
    bytes its rows take in each component of the whole matrix). Cached: a split expert's
    copies ask per decode step; callers must not modify the dict."""
    plan, _ = _component_plan(tuple(shape), spec)
    out = {}
    for name, _, itemsize, _, cshape, _ in plan:
        n = itemsize
        for d in cshape:
            n *= d
        out[name] = n
    return out


def typed_view(buf: torch.Tensor, dtype: torch.dtype, itemsize: int) -> torch.Tensor:
    """The widest `dtype` view of the 1-D uint8 `buf` (its elements that start aligned in
    the storage): a base for as_strided views with absolute storage offsets."""
    if itemsize == 1:
        return buf
    if buf.storage_offset() % itemsize == 0 and buf.numel() % itemsize == 0:
        return buf.view(dtype)  # records and data sections: one call
    lo = -buf.storage_offset() % itemsize
    return buf[lo : lo + (buf.numel() - lo) // itemsize * itemsize].view(dtype)


def component_tensors(buf: torch.Tensor, shape: tuple[int, ...], spec: QuantSpec, base: int = 0) -> dict[str, torch.Tensor]:
    """Zero-copy typed views of one matrix's components inside `buf` (1-D uint8, any device).

    Components start 64-byte aligned inside records that start 4096-byte aligned, so the
    float views below are always aligned when `buf` is a record or the whole data section.
    """
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise LayoutError(f"component buffer must be a 1-D uint8 tensor, got {buf.dtype} of shape {list(buf.shape)}")
    plan, end = _component_plan(tuple(int(d) for d in shape), spec)
    if base < 0 or base + end > buf.numel():
        raise LayoutError(
            f"matrix of shape {list(shape)} ({spec.describe()}) needs bytes [{base}, {base + end}) "
            f"but the buffer has {buf.numel()}"
        )
    # One as_strided call per component on a typed view of the whole buffer (one per dtype)
    # instead of slice + dtype view + shape view: the same views, a third of the torch calls
    # (each costs microseconds of host time, and the fused expert path makes 15 per call).
    offset = buf.storage_offset() + base
    typed: dict[torch.dtype, torch.Tensor] = {}
    out = {}
    for name, dtype, itemsize, coff, cshape, cstride in plan:
        start = offset + coff
        if start % itemsize:
            raise LayoutError(f"component {name} of a {list(shape)} matrix starts at a misaligned byte offset {base + coff}")
        view = typed.get(dtype)
        if view is None:
            view = typed[dtype] = typed_view(buf, dtype, itemsize)
        out[name] = view.as_strided(cshape, cstride, start // itemsize)
    return out


def unpack_plane(packed: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """packed: [rows, nbytes] uint8, codes LSB-first -> [rows, n] uint8 codes."""
    if width == 8:
        return packed[:, :n]
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=packed.device)  # [per_byte]
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << width) - 1)  # [rows, nbytes, per_byte]
    return codes.reshape(packed.shape[0], -1)[:, :n]


def unpack_codes(comps: dict[str, torch.Tensor], bits: int, cols: int) -> torch.Tensor:
    """The `bits`-wide codes of a matrix from its planes (low bits first): [rows, cols] uint8."""
    planes = [comps["q"]] + ([comps["q_hi"]] if "q_hi" in comps else [])
    widths = plane_widths(bits)
    if len(planes) != len(widths):
        raise LayoutError(f"{bits}-bit codes need {len(widths)} bit planes, got {len(planes)}")
    q, shift = None, 0
    for plane, width in zip(planes, widths):
        part = unpack_plane(plane, width, cols)
        q = part if q is None else q | (part << shift)
        shift += width
    return q


def meta_codes(stored: torch.Tensor, n_groups: int, meta_bits: int) -> torch.Tensor:
    """A `scale` or `zero` component (4-bit codes two per byte, or 8-bit codes) -> u8 [n_groups]."""
    if meta_bits == 8:
        return stored
    return unpack_plane(stored.view(1, -1), meta_bits, n_groups).view(-1)


def dequantize_meta(codes: torch.Tensor, meta: torch.Tensor, group: int) -> torch.Tensor:
    """Affine meta codes [n] (one per element) with (step, min) float32 per `group` codes -> float32 [n]."""
    n = codes.numel()
    per = meta.repeat_interleave(group, dim=0)[:n]  # [n, 2]
    # two separately rounded float32 ops, exactly as the numpy reference (no fused multiply-add)
    return per[:, 0] * codes.to(torch.float32) + per[:, 1]


def group_meta(comps: dict[str, torch.Tensor], shape: tuple[int, int], spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantized matrix's per-group scale and zero, float32 [rows, groups, 1] each."""
    rows, cols = shape
    if spec.meta_bits == 16:
        s, z = comps["scale"].to(torch.float32), comps["zero"].to(torch.float32)
    else:
        n_groups = rows * cols // spec.group_size
        s = dequantize_meta(meta_codes(comps["scale"], n_groups, spec.meta_bits), comps["scale_meta"], spec.meta_group_size)
        z = dequantize_meta(meta_codes(comps["zero"], n_groups, spec.meta_bits), comps["zero_meta"], spec.meta_group_size)
    return s.view(rows, -1, 1), z.view(rows, -1, 1)


def dequantize(comps: dict[str, torch.Tensor], shape: tuple[int, ...], spec: QuantSpec, dtype: torch.dtype) -> torch.Tensor:
    """W [rows, cols] in `dtype`, computed in float32: W[r, c] = (q - z_g) * s_g."""
    if not spec.quantized:
        return comps["weight"].to(dtype)
    rows, cols = shape
    g = spec.group_size
    q = unpack_codes(comps, spec.bits, cols).to(torch.float32).view(rows, cols // g, g)
    s, z = group_meta(comps, (rows, cols), spec)
    w = (q - z) * s  # [rows, groups, g]
    return w.view(rows, cols).to(dtype)
