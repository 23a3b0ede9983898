"""Bit packing of unsigned integer codes (docs/FORMAT.md, section "Bit planes").

Codes are packed along the last axis, least significant bits first: for a plane of width b
(1, 2, 4 or 8 bits), code i of a row lives in byte i*b // 8 at bit (i*b) % 8. Read as
little-endian 32-bit words, the same bytes hold code i of the word at bits b*i, so GPU
kernels can load words and CPU code can load bytes from one layout. 3-bit codes are split
into a 2-bit plane (the low bits) and a 1-bit plane (the high bit): no bits are wasted and
every plane keeps the power-of-two layout above.
"""

from __future__ import annotations

import numpy as np

PLANE_BITS = (1, 2, 4, 8)
CODE_BITS = (1, 2, 3, 4, 8)


def plane_widths(bits: int) -> tuple[int, ...]:
    """The widths of the planes a `bits`-wide code is stored in, low bits first."""
    if bits == 3:
        return (2, 1)
    if bits in PLANE_BITS:
        return (bits,)
    raise ValueError(f"unsupported code width {bits}")


def packed_length(n: int, plane_bits: int) -> int:
    return -(-n * plane_bits // 8)


def pack_plane(q: np.ndarray, plane_bits: int) -> np.ndarray:
    """q: [..., n] uint8 codes < 2**plane_bits -> [..., ceil(n*plane_bits/8)] uint8."""
    q = np.asarray(q, dtype=np.uint8)
    if plane_bits == 8:
        return q.copy()
    per_byte = 8 // plane_bits
    n = q.shape[-1]
    pad = (-n) % per_byte
    if pad:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (pad,), np.uint8)], axis=-1)
    q = q.reshape(q.shape[:-1] + (-1, per_byte)).astype(np.uint16)  # [..., bytes, per_byte]
    shifts = (np.arange(per_byte, dtype=np.uint16) * plane_bits)
    return (q << shifts).sum(axis=-1, dtype=np.uint16).astype(np.uint8)


def unpack_plane(packed: np.ndarray, plane_bits: int, n: int) -> np.ndarray:
    """Inverse of pack_plane: [..., bytes] uint8 -> [..., n] uint8 codes."""
    packed = np.asarray(packed, dtype=np.uint8)
    if plane_bits == 8:
        return packed[..., :n].copy()
    per_byte = 8 // plane_bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * plane_bits)
    mask = np.uint8((1 << plane_bits) - 1)
    q = (packed[..., None] >> shifts) & mask  # [..., bytes, per_byte]
    return q.reshape(packed.shape[:-1] + (-1,))[..., :n]


def pack_codes(q: np.ndarray, bits: int) -> list[np.ndarray]:
    """Split `bits`-wide codes into their planes (low bits first) and pack each."""
    q = np.asarray(q)
    if q.size and int(q.max()) >= (1 << bits):
        raise ValueError(f"code {int(q.max())} does not fit in {bits} bits")
    q = q.astype(np.uint8)
    planes, shift = [], 0
    for width in plane_widths(bits):
        planes.append(pack_plane((q >> shift) & ((1 << width) - 1), width))
        shift += width
    return planes


def unpack_codes(planes: list[np.ndarray], bits: int, n: int) -> np.ndarray:
    widths = plane_widths(bits)
    if len(planes) != len(widths):
        raise ValueError(f"{bits}-bit codes need {len(widths)} planes, got {len(planes)}")
    out, shift = None, 0
    for plane, width in zip(planes, widths):
        part = unpack_plane(plane, width, n) << shift
        out = part if out is None else out | part
        shift += width
    return out
