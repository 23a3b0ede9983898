"""Stacking linear layers by rows (runtime.qlinear.concat_rows, Attention.fuse_qkv): the
stacked layer computes exactly the separate ones side by side, on every CPU path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from formats.qtensor import QuantSpec, encode_matrix
from runtime.qlinear import DenseLinear, QuantLinear, concat_rows, rows_concatenable

from .packing_helpers import CPU_KERNEL_TOL


def quant_linear(shape, spec, seed) -> QuantLinear:
    rng = np.random.default_rng(seed)
    groups = shape[0] * shape[1] // spec.group_size
    data = encode_matrix(spec, q=rng.integers(0, 1 << spec.bits, size=shape), scale=rng.uniform(0.01, 0.1, groups),
                         zero=rng.uniform(0, (1 << spec.bits) - 1, groups))
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return QuantLinear(raw, shape, spec, torch.float32)


@pytest.mark.parametrize("spec", [QuantSpec(4, 64, 8, 16), QuantSpec(4, 64, 16), QuantSpec(3, 32, 8, 8),
                                  QuantSpec(2, 16, 8, 128)], ids=lambda s: s.describe().replace(" ", "_"))
@pytest.mark.parametrize("tokens", [1, 3, 80])  # the CPU kernel (few rows) and dequantize + matmul (many)
def test_stacked_quantized_rows_compute_the_separate_layers(spec, tokens):
    shapes = [(128, 256), (64, 256), (64, 256)]  # q, k, v of a small layer
    parts = [quant_linear(s, spec, seed) for seed, s in enumerate(shapes)]
    assert rows_concatenable(shapes, spec)
    qkv = concat_rows(parts)
    assert isinstance(qkv, QuantLinear) and qkv.shape == (256, 256)
    torch.testing.assert_close(qkv.weight(), torch.cat([p.weight() for p in parts]), rtol=0, atol=0)
    x = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(qkv(x), torch.cat([p(x) for p in parts], dim=1), rtol=CPU_KERNEL_TOL, atol=CPU_KERNEL_TOL)


def test_dense_rows_stack():
    parts = [DenseLinear(torch.randn(n, 32)) for n in (16, 8, 8)]
    qkv = concat_rows(parts)
    x = torch.randn(2, 32)
    torch.testing.assert_close(qkv(x), torch.cat([p(x) for p in parts], dim=1))


def test_what_does_not_stack():
    spec = QuantSpec(4, 64, 8, 256)
    # 8-bit meta: 64 x 64 / 64 = 64 groups per matrix, a quarter of a meta group: codes of one
    # meta group would need two (step, min) pairs
    assert not rows_concatenable([(64, 64), (32, 64)], spec)
    assert rows_concatenable([(4096, 4096), (1024, 4096), (1024, 4096)], spec)  # Mixtral's q, k, v
    assert not rows_concatenable([(64, 64), (64, 128)], QuantSpec(16))  # different columns
    assert not rows_concatenable([(64, 64)], QuantSpec(16))  # nothing to stack
    small = [quant_linear((64, 64), spec, s) for s in range(2)]
    assert concat_rows(small) is None
    other = quant_linear((64, 256), QuantSpec(4, 64, 16), 0)
    assert concat_rows([other, quant_linear((64, 256), QuantSpec(4, 32, 16), 1)]) is None  # specs differ
    assert concat_rows([other, DenseLinear(torch.randn(64, 256))]) is None  # kinds differ


def test_fused_model_matches_unfused(file16, packed_files):
    from runtime.loader import load_model

    prompt = torch.tensor([1, 17, 250, 33, 100])
    for path in (file16, packed_files["4/3"]):
        fused, _ = load_model(path, "cpu", torch.float32, ctx=32)
        plain, _ = load_model(path, "cpu", torch.float32, ctx=32, fuse_qkv=False)
        assert all(layer.attn.qkv_proj is not None for layer in fused.layers)
        assert all(layer.attn.qkv_proj is None for layer in plain.layers)
        torch.testing.assert_close(fused(prompt, 0), plain(prompt, 0), rtol=CPU_KERNEL_TOL, atol=CPU_KERNEL_TOL)
        step = torch.tensor([7])
        torch.testing.assert_close(fused(step, 5), plain(step, 5), rtol=CPU_KERNEL_TOL, atol=CPU_KERNEL_TOL)
