"""The packed planes as the kernels read them: int32 words of PER codes each. Shared by the
fused GEMV (qgemv.py) and the word-wise dequantize kernel (prefill.py)."""

from __future__ import annotations

from functools import lru_cache

import torch

from formats.qtensor import QuantSpec

FUSED_BITS = (2, 3, 4, 8)


def codes_per_word(spec: QuantSpec) -> int:
    """Codes per int32 word of the matrix's low bit plane (the kernel's x permutation period)."""
    return 32 // (2 if spec.bits == 3 else spec.bits)


def word_layout_ok(shape: tuple[int, int], spec: QuantSpec) -> bool:
    """Whether the word kernels handle this layout: word loads of every plane need K % 32 == 0,
    and no word may straddle two groups (group size a multiple or a divisor of the codes per
    word: every power of two, and e.g. 24 at 4 bits)."""
    return _word_layout_ok(shape[1], spec)


@lru_cache(maxsize=256)
def _word_layout_ok(k: int, spec: QuantSpec) -> bool:
    if spec.bits not in FUSED_BITS:
        return False
    per, g = codes_per_word(spec), spec.group_size
    return k % 32 == 0 and (g % per == 0 or per % g == 0)


def int_x_ok(k: int, spec: QuantSpec) -> bool:
    """Whether the int16-activation GEMV (triton_gemv._tile_update_int) handles this layout: 2-,
    3-, 4- or 8-bit codes (3-bit: the low plane's words with the high bit OR-ed into each byte)
    in groups of whole words."""
    return _word_layout_ok(k, spec) and spec.bits in (2, 3, 4, 8) and spec.group_size % codes_per_word(spec) == 0


def word_view(plane: torch.Tensor, itemsize: int = 4) -> torch.Tensor | None:
    """uint8 [N, B] plane as int32 words [N, B // 4] (itemsize 2: int16 half-words [N, B // 2]),
    or None when its bytes are not aligned to the item size, or its rows not back to back (the
    kernels address row r at r * B // itemsize)."""
    if plane.data_ptr() % itemsize or plane.shape[1] % itemsize or not plane.is_contiguous():
        return None
    return plane.view({4: torch.int32, 2: torch.int16}[itemsize])


def high_plane_view(plane: torch.Tensor) -> torch.Tensor | None:
    """The 1-bit plane of 3-bit codes as int16 [N, B // 2]: element w holds bit 2 of the 16 codes
    of low-plane word w, so the kernels load it at the low plane's word index (no gather)."""
    return word_view(plane, 2)


def operand_args(comps: dict[str, torch.Tensor]) -> tuple | None:
    """The six pointer arguments of one packed matrix for the word kernels (qgemv_kernel,
    qgemm_kernel): low plane as words, high plane as half-words, scale, scale meta, zero,
    zero meta (unused ones repeat a used tensor); None when a plane is not word aligned."""
    q = word_view(comps["q"])
    qh = high_plane_view(comps["q_hi"]) if "q_hi" in comps else q
    if q is None or qh is None:
        return None
    s, z = comps["scale"], comps["zero"]
    sm, zm = comps.get("scale_meta", s), comps.get("zero_meta", z)
    if not all(t.is_contiguous() for t in (s, sm, z, zm)):  # indexed by the flat group number
        return None
    return (q, qh, s, sm, z, zm)
