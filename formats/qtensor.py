"""Quantized matrices: the quantization spec, the byte layout of one matrix, and the
reference (numpy) encoder and decoder (docs/FORMAT.md, section "Quantized matrices").

A matrix W [rows, cols] (torch Linear convention: y = x @ W.T) with bits b < 16 is cut
into groups of `group_size` consecutive columns of one row. Group i = r * (cols // g) + c // g
has a scale s_i and a zero z_i, and

    W[r, c] = (q[r, c] - z_i) * s_i            (float32 arithmetic)

With meta_bits 8 or 4 the scales (and, separately, the zeros) are themselves quantized in
meta groups of `meta_group_size` consecutive groups: s_i = step_m * code_i + min_m with
m = i // meta_group_size, step and min stored as float32. 8-bit codes are one byte per group;
4-bit codes are packed two per byte, group 2j in the low nibble of byte j (format version 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .errors import ConfigError, LayoutError, SourceError
from .packing import pack_codes, pack_plane, packed_length, plane_widths, unpack_codes, unpack_plane
from .spec import COMPONENT_ALIGNMENT, align_up

WEIGHT_BITS = (2, 3, 4, 8, 16)
META_BITS = (4, 8, 16)
CODED_META_BITS = (4, 8)  # scale/zero stored as codes + (step, min) per meta group


@dataclass(frozen=True)
class QuantSpec:
    """How one matrix is stored. bits=16 means plain float16 (no other field used)."""

    bits: int
    group_size: int = 0
    meta_bits: int = 0
    meta_group_size: int = 0

    def __post_init__(self) -> None:
        if self.bits not in WEIGHT_BITS:
            raise ConfigError(f"bits={self.bits} is not supported (choose one of {WEIGHT_BITS})")
        if self.bits == 16:
            if (self.group_size, self.meta_bits, self.meta_group_size) != (0, 0, 0):
                raise ConfigError("a 16-bit (float16) matrix takes no group size or meta fields")
            return
        if self.group_size < 8 or self.group_size % 8:
            raise ConfigError(f"group size {self.group_size} must be a positive multiple of 8")
        if self.meta_bits not in META_BITS:
            raise ConfigError(f"meta bits {self.meta_bits} not supported (choose 4, 8 or 16)")
        if self.meta_bits in CODED_META_BITS and self.meta_group_size < 1:
            raise ConfigError(f"meta group size {self.meta_group_size} must be positive")
        if self.meta_bits == 16 and self.meta_group_size != 0:
            raise ConfigError("16-bit meta takes no meta group size")

    @property
    def quantized(self) -> bool:
        return self.bits != 16

    @property
    def coded_meta(self) -> bool:
        """Scale and zero stored as codes with a (step, min) pair per meta group."""
        return self.quantized and self.meta_bits in CODED_META_BITS

    def to_json(self) -> dict:
        if not self.quantized:
            return {"bits": 16}
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "meta_bits": self.meta_bits,
            "meta_group_size": self.meta_group_size,
        }

    def describe(self) -> str:
        if not self.quantized:
            return "fp16"
        meta = "fp16 meta" if self.meta_bits == 16 else f"{self.meta_bits}-bit meta g{self.meta_group_size}"
        return f"{self.bits}-bit g{self.group_size}, {meta}"


@dataclass(frozen=True)
class Component:
    """One contiguous array inside a record: `offset` is relative to the matrix start."""

    name: str
    dtype: str  # "u8", "f16" or "f32"
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        # math.prod: exact Python ints (np.prod wraps silently past 2**63) and no numpy call overhead
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


DTYPES = {"u8": np.dtype("<u1"), "f16": np.dtype("<f2"), "f32": np.dtype("<f4")}


def _component_shapes(shape: tuple[int, ...], spec: QuantSpec) -> list[tuple[str, str, tuple]]:
    if not spec.quantized:
        return [("weight", "f16", tuple(shape))]
    if len(shape) != 2:
        raise LayoutError(f"only 2-D matrices can be quantized, got shape {list(shape)}")
    rows, cols = shape
    if cols % spec.group_size:
        raise LayoutError(
            f"matrix of shape {list(shape)}: {cols} columns are not a multiple of group size {spec.group_size}",
            hint="choose a group size that divides the matrix's input dimension",
        )
    planes = [
        ("q" if i == 0 else "q_hi", "u8", (rows, packed_length(cols, width)))
        for i, width in enumerate(plane_widths(spec.bits))
    ]
    n_groups = rows * (cols // spec.group_size)
    if spec.meta_bits == 16:
        return planes + [("scale", "f16", (n_groups,)), ("zero", "f16", (n_groups,))]
    n_meta = -(-n_groups // spec.meta_group_size)
    n_codes = packed_length(n_groups, spec.meta_bits)
    return planes + [
        ("scale", "u8", (n_codes,)),
        ("scale_meta", "f32", (n_meta, 2)),
        ("zero", "u8", (n_codes,)),
        ("zero_meta", "f32", (n_meta, 2)),
    ]


def matrix_layout(shape: tuple[int, ...], spec: QuantSpec) -> tuple[tuple[Component, ...], int]:
    """The components of one matrix, each 64-byte aligned, and the bytes they span."""
    return _matrix_layout(tuple(int(d) for d in shape), spec)


# A header names the same few (shape, spec) pairs hundreds of times; the result is immutable.
@lru_cache(maxsize=1024)
def _matrix_layout(shape: tuple[int, ...], spec: QuantSpec) -> tuple[tuple[Component, ...], int]:
    comps, offset = [], 0
    for name, dtype, cshape in _component_shapes(shape, spec):
        comps.append(Component(name, dtype, tuple(int(d) for d in cshape), offset))
        offset = align_up(offset + comps[-1].nbytes, COMPONENT_ALIGNMENT)
    end = comps[-1].offset + comps[-1].nbytes
    return tuple(comps), end


def quantize_meta(values: np.ndarray, group: int, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Affine `bits`-bit quantization of `values` [n] in groups of `group`: (codes u8 [n], one
    code per element, not yet packed; meta f32 [M, 2])."""
    top = np.float32((1 << bits) - 1)
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    n = v.size
    m = -(-n // group)
    padded = np.concatenate([v, np.full(m * group - n, v[-1] if n else 0, np.float32)]).reshape(m, group)
    lo = padded.min(axis=1)
    # a range past float32 (or a NaN) leaves a non-finite step: encode_matrix refuses it
    with np.errstate(over="ignore", invalid="ignore"):
        step = ((padded.max(axis=1) - lo) / top).astype(np.float32)
        safe = np.where(step > 0, step, np.float32(1))
        codes = np.nan_to_num(np.clip(np.rint((padded - lo[:, None]) / safe[:, None]), 0, top)).astype(np.uint8)
    return codes.reshape(-1)[:n], np.stack([step, lo], axis=1).astype(np.float32)


def dequantize_meta(codes: np.ndarray, meta: np.ndarray, group: int) -> np.ndarray:
    """Unpacked codes [n] (one per element) -> float32 [n]: step * code + min per meta group."""
    idx = np.arange(codes.size) // group
    return meta[idx, 0] * codes.astype(np.float32) + meta[idx, 1]


def meta_codes(stored: np.ndarray, n_groups: int, meta_bits: int) -> np.ndarray:
    """The stored `scale` or `zero` component -> one u8 code per group [n_groups]."""
    return unpack_plane(stored, meta_bits, n_groups)


def encode_meta(values: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stored codes, (step, min) pairs, the values they decode to) for per-group scales or zeros."""
    codes, meta = quantize_meta(values, spec.meta_group_size, spec.meta_bits)
    with np.errstate(over="ignore", invalid="ignore"):  # a non-finite meta is refused by encode_matrix
        decoded = dequantize_meta(codes, meta, spec.meta_group_size)
    return pack_plane(codes, spec.meta_bits), meta, decoded


def encode_matrix(
    spec: QuantSpec,
    *,
    weight: np.ndarray | None = None,
    q: np.ndarray | None = None,
    scale: np.ndarray | None = None,
    zero: np.ndarray | None = None,
) -> bytes:
    """The bytes of one matrix laid out by matrix_layout (padding zeroed).

    For bits=16 pass `weight` [rows, cols]; otherwise pass integer codes `q` [rows, cols]
    and per-group float `scale`/`zero` [rows * cols // group_size] (row-major groups).
    """
    if not spec.quantized:
        w = np.asarray(weight)
        with np.errstate(over="ignore"):  # overflow to inf is reported below, with context
            arrays = {"weight": w.astype("<f2")}
        shape = w.shape
    else:
        q = np.asarray(q)
        shape = q.shape
        arrays = dict(zip(("q", "q_hi"), pack_codes(q, spec.bits)))
        scale = np.asarray(scale, np.float32).reshape(-1)
        zero = np.asarray(zero, np.float32).reshape(-1)
        if spec.meta_bits == 16:
            with np.errstate(over="ignore"):
                arrays["scale"], arrays["zero"] = scale.astype("<f2"), zero.astype("<f2")
        else:
            arrays["scale"], arrays["scale_meta"], _ = encode_meta(scale, spec)
            arrays["zero"], arrays["zero_meta"], _ = encode_meta(zero, spec)
    comps, size = matrix_layout(shape, spec)
    out = bytearray(size)
    for c in comps:
        a = np.ascontiguousarray(arrays[c.name], dtype=DTYPES[c.dtype])
        if a.shape != c.shape:
            raise LayoutError(f"component {c.name}: shape {list(a.shape)} != expected {list(c.shape)}")
        # an inf or NaN stored here would decode to garbage silently, far from its cause
        if c.dtype != "u8" and not np.isfinite(a).all():
            raise SourceError(
                f"{spec.describe()} matrix of shape {list(shape)}: component {c.name} is not finite in {c.dtype}",
                hint="the source tensor holds inf/NaN, or values past the float16 range (65504)",
            )
        out[c.offset : c.offset + c.nbytes] = a.tobytes()
    return bytes(out)


def component_views(buf, shape: tuple[int, ...], spec: QuantSpec, base: int = 0) -> dict[str, np.ndarray]:
    """Zero-copy numpy views of a matrix's components in `buf` (bytes-like) at `base`."""
    comps, _ = matrix_layout(shape, spec)
    return {
        c.name: np.frombuffer(buf, dtype=DTYPES[c.dtype], count=int(np.prod(c.shape)), offset=base + c.offset).reshape(c.shape)
        for c in comps
    }


def decode_matrix(views: dict[str, np.ndarray], shape: tuple[int, ...], spec: QuantSpec) -> np.ndarray:
    """Reference dequantization to float32 [rows, cols]: the definition the runtime must match."""
    if not spec.quantized:
        return views["weight"].astype(np.float32)
    rows, cols = shape
    planes = [views["q"]] + ([views["q_hi"]] if "q_hi" in views else [])
    q = unpack_codes(planes, spec.bits, cols).astype(np.float32)  # [rows, cols]
    if spec.meta_bits == 16:
        s, z = views["scale"].astype(np.float32), views["zero"].astype(np.float32)
    else:
        n_groups = rows * cols // spec.group_size
        s = dequantize_meta(meta_codes(views["scale"], n_groups, spec.meta_bits), views["scale_meta"], spec.meta_group_size)
        z = dequantize_meta(meta_codes(views["zero"], n_groups, spec.meta_bits), views["zero_meta"], spec.meta_group_size)
    g = spec.group_size
    q = q.reshape(rows, cols // g, g)
    w = (q - z.reshape(rows, -1, 1)) * s.reshape(rows, -1, 1)
    return w.reshape(rows, cols).astype(np.float32)
