"""runtime.dequant against the format's numpy reference decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from formats.errors import LayoutError
from formats.qtensor import QuantSpec, component_views, decode_matrix, encode_matrix
from runtime.dequant import component_tensors, dequantize

SHAPES = [(8, 64), (5, 48), (33, 128), (1, 256)]
SPECS = [QuantSpec(16)] + [
    QuantSpec(bits, g, meta, mg)
    for bits in (2, 3, 4, 8)
    for g, meta, mg in ((16, 8, 3), (16, 16, 0), (8, 8, 128))
]


def random_matrix(rng, shape, spec) -> bytes:
    if not spec.quantized:
        return encode_matrix(spec, weight=rng.standard_normal(shape) * 3)
    n_groups = shape[0] * shape[1] // spec.group_size
    q = rng.integers(0, 1 << spec.bits, shape)
    return encode_matrix(spec, q=q, scale=rng.random(n_groups) * 0.1 + 1e-3, zero=rng.random(n_groups) * (1 << spec.bits))


def in_buffer(payload: bytes, base: int) -> np.ndarray:
    buf = np.zeros(base + len(payload) + 100, np.uint8)  # junk after: views must stop at their own bytes
    buf[base : base + len(payload)] = np.frombuffer(payload, np.uint8)
    buf[base + len(payload):] = 0xAB
    return buf


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe().replace(" ", "_"))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dequantize_is_bit_exact(spec, shape):
    rng = np.random.default_rng(hash((spec, shape)) % 2**32)
    buf = in_buffer(random_matrix(rng, shape, spec), base=4096)
    ref = decode_matrix(component_views(buf, shape, spec, base=4096), shape, spec)
    got = dequantize(component_tensors(torch.from_numpy(buf), shape, spec, base=4096), shape, spec, torch.float32)
    assert got.shape == shape and got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy().view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_casts_at_the_end(dtype):
    spec, shape = QuantSpec(3, 16, 8, 4), (16, 64)
    buf = torch.from_numpy(in_buffer(random_matrix(np.random.default_rng(1), shape, spec), 0))
    comps = component_tensors(buf, shape, spec)
    assert torch.equal(dequantize(comps, shape, spec, dtype), dequantize(comps, shape, spec, torch.float32).to(dtype))


def test_component_tensors_are_zero_copy_views():
    spec, shape = QuantSpec(2, 16, 8, 3), (8, 64)
    buf = torch.from_numpy(in_buffer(random_matrix(np.random.default_rng(2), shape, spec), 64))
    comps = component_tensors(buf, shape, spec, base=64)
    assert {k: v.dtype for k, v in comps.items()} == {
        "q": torch.uint8, "scale": torch.uint8, "scale_meta": torch.float32, "zero": torch.uint8, "zero_meta": torch.float32,
    }
    assert comps["q"].shape == (8, 16)
    before = dequantize(comps, shape, spec, torch.float32)
    buf[64] ^= 0xFF  # first byte of the q plane: the view sees it
    assert not torch.equal(dequantize(comps, shape, spec, torch.float32), before)


def test_component_tensors_rejects_bad_buffers():
    spec, shape = QuantSpec(4, 16, 16), (4, 32)
    buf = torch.from_numpy(in_buffer(random_matrix(np.random.default_rng(3), shape, spec), 0))
    with pytest.raises(LayoutError, match="needs bytes"):
        component_tensors(buf[:100], shape, spec)
    with pytest.raises(LayoutError, match="misaligned"):
        component_tensors(buf, shape, spec, base=1)
    with pytest.raises(LayoutError, match="1-D uint8"):
        component_tensors(buf.view(torch.int8), shape, spec)
