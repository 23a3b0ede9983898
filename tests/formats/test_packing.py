"""Bit planes (docs/FORMAT.md "Bit planes"), checked against a bit-by-bit reading of the rule
rather than against the packer's own inverse alone."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from formats.packing import CODE_BITS, PLANE_BITS, pack_codes, pack_plane, packed_length, unpack_codes, unpack_plane

SETTINGS = settings(max_examples=60, deadline=None)


def codes(bits: int):
    """Arrays [rows..., n] of `bits`-wide codes with odd lengths and leading dims."""
    shape = st.tuples(st.integers(0, 3), st.integers(1, 37)).map(lambda s: s[1:] if s[0] == 0 else s)
    return hnp.arrays(np.uint8, shape, elements=st.integers(0, (1 << bits) - 1))


def reference_plane(q: np.ndarray, b: int) -> np.ndarray:
    """The rule, one bit at a time: code i of a row occupies bits (i*b) .. (i*b + b - 1) of
    the row's little-endian bit stream, whose bit k is bit k % 8 of byte k // 8."""
    q2 = q.reshape(-1, q.shape[-1])
    out = np.zeros((q2.shape[0], packed_length(q.shape[-1], b)), np.uint8)
    for r, row in enumerate(q2):
        for i, code in enumerate(row.tolist()):
            for j in range(b):
                k = i * b + j
                out[r, k // 8] |= ((code >> j) & 1) << (k % 8)
    return out.reshape(q.shape[:-1] + (out.shape[-1],))


@pytest.mark.parametrize("b", PLANE_BITS)
@SETTINGS
@given(data=st.data())
def test_plane_matches_the_bit_rule_and_round_trips(b, data):
    q = data.draw(codes(b))
    packed = pack_plane(q, b)
    assert packed.dtype == np.uint8
    assert packed.shape == q.shape[:-1] + (packed_length(q.shape[-1], b),)
    np.testing.assert_array_equal(packed, reference_plane(q, b))  # also: the unused high bits are 0
    np.testing.assert_array_equal(unpack_plane(packed, b, q.shape[-1]), q)


@pytest.mark.parametrize("b", PLANE_BITS)
@SETTINGS
@given(data=st.data())
def test_plane_read_as_little_endian_words(b, data):
    """A kernel loading uint32 words finds code i of the word at bits b*i (FORMAT.md)."""
    q = data.draw(codes(b)).reshape(-1)
    packed = pack_plane(q, b)
    words = np.frombuffer(packed.tobytes() + bytes(-len(packed) % 4), dtype="<u4")
    per_word = 32 // b
    for i, code in enumerate(q.tolist()):
        assert (int(words[i // per_word]) >> (b * (i % per_word))) & ((1 << b) - 1) == code


@pytest.mark.parametrize("bits", CODE_BITS)
@SETTINGS
@given(data=st.data())
def test_codes_round_trip(bits, data):
    q = data.draw(codes(bits))
    planes = pack_codes(q, bits)
    np.testing.assert_array_equal(unpack_codes(planes, bits, q.shape[-1]), q)


@SETTINGS
@given(q=codes(3))
def test_three_bit_codes_are_a_two_bit_low_plane_and_a_one_bit_high_plane(q):
    low, high = pack_codes(q, 3)
    np.testing.assert_array_equal(low, reference_plane(q & 3, 2))
    np.testing.assert_array_equal(high, reference_plane(q >> 2, 1))


def test_known_bytes():
    # codes 0,1,2,3 at 2 bits: 0b11_10_01_00 = 0xe4; 4-bit 0x1, 0x2 -> 0x21; 1-bit 1,0,1 -> 0b101
    assert pack_plane(np.array([0, 1, 2, 3], np.uint8), 2).tobytes() == b"\xe4"
    assert pack_plane(np.array([1, 2], np.uint8), 4).tobytes() == b"\x21"
    assert pack_plane(np.array([1, 0, 1], np.uint8), 1).tobytes() == b"\x05"
    low, high = pack_codes(np.array([7, 4, 3, 0, 5], np.uint8), 3)
    assert (low.tobytes(), high.tobytes()) == (bytes([0b00_11_00_11, 0b01]), bytes([0b10011]))


@pytest.mark.parametrize("bits", [b for b in CODE_BITS if b < 8])  # every uint8 fits 8 bits
def test_codes_too_wide_are_refused(bits):
    with pytest.raises(ValueError, match=f"does not fit in {bits} bits"):
        pack_codes(np.array([1 << bits], np.uint8), bits)


def test_unsupported_widths_are_refused():
    with pytest.raises(ValueError):
        pack_codes(np.zeros(4, np.uint8), 5)
    with pytest.raises(ValueError, match="need 2 planes"):
        unpack_codes([np.zeros(1, np.uint8)], 3, 4)
