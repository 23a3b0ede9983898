"""Quantized matrices (docs/FORMAT.md "Quantized matrices"): the layout of one matrix and the
reference decoder, checked against the formula computed here from q, scale and zero."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formats.errors import ConfigError, LayoutError, SourceError
from formats.qtensor import QuantSpec, component_views, decode_matrix, encode_matrix, matrix_layout, quantize_meta
from formats.spec import COMPONENT_ALIGNMENT

SPECS = [
    QuantSpec(bits, group, meta, meta_group)
    for bits in (2, 3, 4, 8)
    for group, meta, meta_group in ((8, 16, 0), (16, 8, 1), (8, 8, 3), (24, 8, 128), (8, 4, 1), (16, 4, 3), (24, 4, 128))
] + [QuantSpec(16)]

F32 = np.float32


def unpack_reference(buf: bytes, comps: dict, rows: int, cols: int, bits: int) -> np.ndarray:
    """Codes straight from the bytes by the FORMAT.md rule, not through formats.packing."""
    widths = (2, 1) if bits == 3 else (bits,)
    q = np.zeros((rows, cols), np.int64)
    shift = 0
    for name, b in zip(("q", "q_hi"), widths):
        c = comps[name]
        plane = np.frombuffer(buf, np.uint8, count=c.nbytes, offset=c.offset).reshape(c.shape)
        for r in range(rows):
            for i in range(cols):
                bit = i * b
                q[r, i] |= ((int(plane[r, bit // 8]) >> (bit % 8)) & ((1 << b) - 1)) << shift
        shift += b
    return q


def meta_reference(values: np.ndarray, group: int, bits: int = 8) -> np.ndarray:
    """s_hat = step * code + min in float32, from quantize_meta's codes and (step, min)."""
    codes, meta = quantize_meta(values, group, bits)
    assert codes.max(initial=0) < (1 << bits)
    assert codes.dtype == np.uint8 and meta.dtype == np.float32 and meta.shape == (-(-len(values) // group), 2)
    m = np.arange(len(values)) // group
    return (meta[m, 0] * codes.astype(F32) + meta[m, 1]).astype(F32)


@st.composite
def matrices(draw, spec: QuantSpec):
    rows = draw(st.integers(1, 5))
    g = spec.group_size or 8
    cols = g * draw(st.integers(1, 3))
    n_groups = rows * cols // g
    finite = dict(allow_nan=False, allow_infinity=False, width=32)
    q = np.array(draw(st.lists(st.integers(0, (1 << min(spec.bits, 8)) - 1), min_size=rows * cols, max_size=rows * cols)), np.uint8)
    scale = np.array(draw(st.lists(st.floats(-4, 4, **finite), min_size=n_groups, max_size=n_groups)), F32)
    zero = np.array(draw(st.lists(st.floats(-2, 17, **finite), min_size=n_groups, max_size=n_groups)), F32)
    return q.reshape(rows, cols), scale, zero


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe().replace(" ", ""))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_decode_is_the_formula(spec, data):
    q, scale, zero = data.draw(matrices(spec))
    rows, cols = q.shape
    if not spec.quantized:
        w = q.astype(F32) * scale[0] - zero[0]
        buf = encode_matrix(spec, weight=w)
        got = decode_matrix(component_views(buf, w.shape, spec), w.shape, spec)
        np.testing.assert_array_equal(got, w.astype(np.float16).astype(F32))
        return
    buf = encode_matrix(spec, q=q, scale=scale, zero=zero)
    comps, nbytes = matrix_layout(q.shape, spec)
    assert len(buf) == nbytes
    by_name = {c.name: c for c in comps}
    np.testing.assert_array_equal(unpack_reference(buf, by_name, rows, cols, spec.bits), q)

    if spec.meta_bits == 16:
        s_hat, z_hat = scale.astype(np.float16).astype(F32), zero.astype(np.float16).astype(F32)
    else:
        s_hat = meta_reference(scale, spec.meta_group_size, spec.meta_bits)
        z_hat = meta_reference(zero, spec.meta_group_size, spec.meta_bits)
        for name, values in (("scale", scale), ("zero", zero)):  # codes read by FORMAT.md's rule
            c = by_name[name]
            stored = np.frombuffer(buf, np.uint8, count=c.nbytes, offset=c.offset)
            per = 8 // spec.meta_bits
            codes = [(int(stored[i // per]) >> (i % per * spec.meta_bits)) & ((1 << spec.meta_bits) - 1)
                     for i in range(len(values))]
            np.testing.assert_array_equal(codes, quantize_meta(values, spec.meta_group_size, spec.meta_bits)[0])
    g = np.arange(rows * cols).reshape(rows, cols) // spec.group_size  # row-major groups along the columns
    want = (q.astype(F32) - z_hat[g]) * s_hat[g]
    got = decode_matrix(component_views(buf, q.shape, spec), q.shape, spec)
    assert got.dtype == F32
    np.testing.assert_array_equal(got, want)


BIG = float(np.float32(1e37))  # a meta group's max - min must stay inside float32


@pytest.mark.parametrize("bits", [8, 4])
@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(-BIG, BIG, width=32) | st.floats(-4, 4, width=32), min_size=1, max_size=300),
    group=st.integers(1, 130),
)
def test_meta_error_bound(bits, values, group):
    """Each reconstructed value is within half a step of the original (plus float32 rounding)."""
    v = np.array(values, F32)
    codes, meta = quantize_meta(v, group, bits)
    s_hat = meta_reference(v, group, bits)
    m = np.arange(len(v)) // group
    step = meta[m, 0].astype(np.float64)
    # float32 rounding: of step itself (times up to 255 codes; large when step is subnormal)
    # and of the multiply-add
    eps = 256 * np.spacing(meta[m, 0]).astype(np.float64)
    eps += 4 * np.spacing(np.maximum(np.abs(v), np.abs(s_hat)).astype(F32)).astype(np.float64)
    assert np.all(np.abs(v.astype(np.float64) - s_hat) <= step / 2 + eps)
    lo = np.minimum.reduceat(v, np.arange(0, len(v), group))
    np.testing.assert_array_equal(meta[:, 1], lo)  # min is stored exactly


@pytest.mark.parametrize("spec, scale", [
    (QuantSpec(2, 8, 8, 4), [3e38, -3e38]),  # the meta range overflows float32
    (QuantSpec(2, 8, 8, 4), [np.nan, 1.0]),
    (QuantSpec(2, 8, 16, 0), [1e5, 1.0]),  # past the float16 range
    (QuantSpec(2, 8, 16, 0), [np.inf, 1.0]),
])
def test_non_finite_stored_floats_are_refused(spec, scale):
    with pytest.raises(SourceError, match="component scale(_meta)? is not finite"):
        encode_matrix(spec, q=np.zeros((1, 16), np.uint8), scale=np.array(scale, F32), zero=np.zeros(2, F32))


def test_non_finite_fp16_weight_is_refused():
    with pytest.raises(SourceError, match="component weight is not finite in f16"):
        encode_matrix(QuantSpec(16), weight=np.array([1.0, 7e4], F32))


def test_constant_meta_group_is_exact():
    codes, meta = quantize_meta(np.full(10, 0.3, F32), 4)
    assert not codes.any() and np.all(meta[:, 0] == 0) and np.all(meta[:, 1] == F32(0.3))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe().replace(" ", ""))
@pytest.mark.parametrize("shape", [(1, 24 * 8), (7, 24 * 2), (3, 24 * 16)])
def test_layout_alignment_order_and_zero_padding(spec, shape):
    rows, cols = shape
    comps, nbytes = matrix_layout(shape, spec)
    expected_names = {
        16: ["weight"],
    }.get(spec.bits) or (["q", "q_hi"] if spec.bits == 3 else ["q"]) + (
        ["scale", "zero"] if spec.meta_bits == 16 else ["scale", "scale_meta", "zero", "zero_meta"]
    )
    assert [c.name for c in comps] == expected_names
    assert comps[0].offset == 0
    for a, b in zip(comps, comps[1:]):
        assert b.offset % COMPONENT_ALIGNMENT == 0
        assert b.offset == -(-(a.offset + a.nbytes) // COMPONENT_ALIGNMENT) * COMPONENT_ALIGNMENT  # packed tight
    assert nbytes == comps[-1].offset + comps[-1].nbytes  # no padding after the last component
    if spec.quantized:
        rng = np.random.default_rng(0)
        n_groups = rows * cols // spec.group_size
        buf = encode_matrix(spec, q=rng.integers(0, 1 << spec.bits, shape), scale=rng.random(n_groups) + 1, zero=rng.random(n_groups))
    else:
        buf = encode_matrix(spec, weight=np.ones(shape, F32))
    used = np.zeros(nbytes, bool)
    for c in comps:
        used[c.offset : c.offset + c.nbytes] = True
    assert not any(np.frombuffer(buf, np.uint8)[~used])


def test_meta_and_code_shapes_of_a_mixtral_expert_matrix():
    comps, nbytes = matrix_layout((14336, 4096), QuantSpec(2, 16, 8, 128))
    assert {c.name: (c.dtype, c.shape) for c in comps} == {
        "q": ("u8", (14336, 1024)), "scale": ("u8", (3670016,)), "scale_meta": ("f32", (28672, 2)),
        "zero": ("u8", (3670016,)), "zero_meta": ("f32", (28672, 2)),
    }
    assert nbytes == 22_478_848


def test_4bit_meta_packs_two_codes_per_byte():
    comps, nbytes = matrix_layout((14336, 4096), QuantSpec(2, 16, 4, 128))
    assert {c.name: (c.dtype, c.shape) for c in comps} == {
        "q": ("u8", (14336, 1024)), "scale": ("u8", (1835008,)), "scale_meta": ("f32", (28672, 2)),
        "zero": ("u8", (1835008,)), "zero_meta": ("f32", (28672, 2)),
    }
    assert nbytes == 18_808_832  # 2.56 bits per weight, against 3.06 with 8-bit meta


def test_4bit_meta_of_an_odd_group_count_leaves_the_last_high_nibble_zero():
    spec = QuantSpec(2, 8, 4, 2)
    scale = np.array([1.0, 2.0, 3.0], F32)  # meta groups [1, 2] and [3]: codes 0, 15 and 0
    buf = encode_matrix(spec, q=np.zeros((3, 8), np.uint8), scale=scale, zero=np.ones(3, F32))
    c = {c.name: c for c in matrix_layout((3, 8), spec)[0]}["scale"]
    stored = np.frombuffer(buf, np.uint8, count=c.nbytes, offset=c.offset)
    assert stored.shape == (2,) and stored[1] >> 4 == 0 and stored[0] == 0xF0 and stored[1] == 0x00


@pytest.mark.parametrize("kwargs, needle", [
    (dict(bits=5, group_size=16, meta_bits=8, meta_group_size=4), "bits=5"),
    (dict(bits=2, group_size=12, meta_bits=8, meta_group_size=4), "group size 12"),
    (dict(bits=2, group_size=0, meta_bits=8, meta_group_size=4), "group size 0"),
    (dict(bits=2, group_size=16, meta_bits=5, meta_group_size=4), "meta bits 5"),
    (dict(bits=2, group_size=16, meta_bits=4, meta_group_size=0), "meta group size 0"),
    (dict(bits=2, group_size=16, meta_bits=8, meta_group_size=0), "meta group size 0"),
    (dict(bits=2, group_size=16, meta_bits=16, meta_group_size=4), "16-bit meta"),
    (dict(bits=16, group_size=16), "16-bit"),
])
def test_bad_specs(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        QuantSpec(**kwargs)


def test_columns_must_be_a_multiple_of_the_group():
    with pytest.raises(LayoutError, match="not a multiple of group size 16"):
        matrix_layout((4, 24), QuantSpec(2, 16, 8, 4))
    with pytest.raises(LayoutError, match="only 2-D"):
        matrix_layout((4, 16, 16), QuantSpec(2, 16, 8, 4))
