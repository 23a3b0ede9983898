"""The compiled CPU kernel on a prompt's tokens: several tokens in one pass share each code's
decode and give the token-by-token result bit for bit, and its dequantization of a whole matrix
(moepack_dequant, used past the GEMV's token limit) gives dequant.dequantize's bits. The shared
helpers are in cpu_native_cases.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from formats.qtensor import QuantSpec
from runtime import cpu_expert, cpu_native
from tests.runtime.cpu_native_cases import CASES, assert_tokens_batch_exactly, needs_native, quantize_x, rel, run, x_steps
from tests.runtime.kernel_cases import packed


# (spec, N, K) for prompts: the quantizer's defaults (a copy of the fast path per token count),
# another fast geometry (one token at a time) and the per-row path
PROMPT_CASES = [
    (QuantSpec(2, 16, 4, 128), 40, 5120),
    (QuantSpec(2, 16, 8, 128), 40, 1024),
    (QuantSpec(3, 64, 4, 128), 40, 2048),
    (QuantSpec(4, 64, 8, 256), 24, 2048),
    (QuantSpec(2, 32, 8, 64), 24, 1024),
    (QuantSpec(2, 16, 8, 5), 24, 256),
]


@needs_native
@pytest.mark.parametrize("spec,n,k", PROMPT_CASES, ids=lambda v: v.describe() if isinstance(v, QuantSpec) else str(v))
@pytest.mark.parametrize("tokens", [2, 5, 9])
def test_tokens_together_equal_tokens_alone(spec, n, k, tokens):
    data, w = packed((n, k), spec, seed=n + k + tokens)
    x = np.random.default_rng(tokens).standard_normal((tokens, k)).astype(np.float32)
    y = assert_tokens_batch_exactly(lambda *a: run(*a, threads=2), data, (n, k), spec, x)
    cu = 8 if spec.bits == 4 else 16
    assert rel(y, quantize_x(x, cu, x_steps(spec.bits)) @ w.astype(np.float64).T) < 2e-6


@needs_native
@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), words_per_group=st.sampled_from([1, 2, 4]), blocks=st.integers(1, 6),
       rows=st.integers(1, 40), mg_blocks=st.integers(1, 5), tokens=st.integers(2, 9), seed=st.integers(0, 2**16),
       meta_bits=st.sampled_from([8, 4]))
def test_any_fast_geometry_batches_tokens_exactly(bits, words_per_group, blocks, rows, mg_blocks, tokens, seed,
                                                  meta_bits):
    """Fast-path geometries (8 | groups per row and meta group; the defaults among them take 2
    or 4 tokens per pass): any token count gives the token-by-token result bit for bit, and the
    rounded reference."""
    cu = 8 if bits == 4 else 16
    _batches_exactly(QuantSpec(bits, cu * words_per_group, meta_bits, 8 * mg_blocks), rows, blocks * 8, tokens, seed)


def _batches_exactly(spec: QuantSpec, rows: int, groups: int, tokens: int, seed: int) -> None:
    """Tokens through one pass equal them one at a time, bit for bit, and the rounded reference."""
    cu = 8 if spec.bits == 4 else 16
    k = spec.group_size * groups
    data, w = packed((rows, k), spec, seed=seed)
    x = np.random.default_rng(seed).standard_normal((tokens, k)).astype(np.float32)
    y = assert_tokens_batch_exactly(lambda *a: run(*a, threads=2), data, (rows, k), spec, x)
    xq = quantize_x(x, cu, x_steps(spec.bits))
    ref = xq @ w.astype(np.float64).T
    assert np.all(np.abs(y - ref) <= 1e-5 * (np.abs(xq) @ np.abs(w.astype(np.float64)).T) + 1e-9)


@needs_native
@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), words_per_group=st.sampled_from([1, 2, 4, 8]), groups=st.integers(8, 40),
       rows=st.integers(1, 30), mg=st.integers(8, 200), tokens=st.integers(2, 9), seed=st.integers(0, 2**16),
       meta_bits=st.sampled_from([8, 4]))
def test_part_blocks_and_straddling_blocks_batch_tokens_exactly(bits, words_per_group, groups, rows, mg, tokens, seed,
                                                                meta_bits):
    """Rows of any number of groups (a part-block at the end) and meta groups of 8 groups or
    more (blocks across two): bit for bit token by token, and the rounded reference."""
    cu = 8 if bits == 4 else 16
    _batches_exactly(QuantSpec(bits, cu * words_per_group, meta_bits, mg), rows, groups, tokens, seed)


@needs_native
@pytest.mark.parametrize("spec,n,k", CASES, ids=lambda v: v.describe() if isinstance(v, QuantSpec) else str(v))
def test_dequant_is_the_reference_bit_for_bit(spec, n, k):
    """moepack_dequant: every geometry of CASES (fast and per-row, 2/3/4-bit codes, 8- and 4-bit
    meta), the same float32 bits as dequant.dequantize."""
    from runtime.dequant import component_tensors, dequantize

    data, _ = packed((n, k), spec, seed=n * k + spec.bits)
    buf = torch.frombuffer(bytearray(b"\0" * 64 + data), dtype=torch.uint8)  # components past byte 64
    got = cpu_native.native_kernel().dequant(buf, cpu_native.matrix_descriptor((n, k), spec, 64), 2)
    ref = dequantize(component_tensors(buf, (n, k), spec, base=64), (n, k), spec, torch.float32)
    assert got is not None and torch.equal(got, ref)


@needs_native
@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), words_per_group=st.sampled_from([1, 2, 3, 4, 8]), groups=st.integers(1, 20),
       rows=st.integers(1, 40), mg=st.integers(1, 300), seed=st.integers(0, 2**16), meta_bits=st.sampled_from([8, 4]))
def test_dequant_any_geometry(bits, words_per_group, groups, rows, mg, seed, meta_bits):
    from runtime.dequant import component_tensors, dequantize

    spec = QuantSpec(bits, (8 if bits == 4 else 16) * words_per_group, meta_bits, mg)
    k = spec.group_size * groups
    data, _ = packed((rows, k), spec, seed=seed)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    got = cpu_native.native_kernel().dequant(buf, cpu_native.matrix_descriptor((rows, k), spec), 1)
    assert torch.equal(got, dequantize(component_tensors(buf, (rows, k), spec), (rows, k), spec, torch.float32))


@pytest.mark.parametrize("spec", [QuantSpec(2, 16, 4, 128), QuantSpec(8, 64, 8, 128), QuantSpec(4, 64, 16, 0)],
                         ids=QuantSpec.describe)
def test_dequantize_packed_is_the_reference_with_or_without_the_kernel(spec, monkeypatch):
    """cpu_expert.dequantize_packed: the compiled kernel where it takes the layout, torch's
    dequantize for the rest (8-bit codes, fp16 meta) and without the kernel; the same bits."""
    from runtime.dequant import component_tensors, dequantize

    data, _ = packed((24, 256), spec, seed=5)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    ref = dequantize(component_tensors(buf, (24, 256), spec), (24, 256), spec, torch.float32)
    assert torch.equal(cpu_expert.dequantize_packed(buf, (24, 256), spec, 0, torch.float32), ref)
    monkeypatch.setattr(cpu_expert, "_native", lambda: None)
    assert torch.equal(cpu_expert.dequantize_packed(buf, (24, 256), spec, 0, torch.float16), ref.half())


@needs_native
def test_transient_weights_share_the_threads_scratch():
    """dequantize_packed(transient=True): the same bits, written into this thread's scratch (a
    view: the next transient call overwrites it; another thread has its own), and the plain
    expert FFN through it equals the one over three separate matrices bit for bit."""
    import threading

    import torch.nn.functional as F

    from runtime.dequant import component_tensors, dequantize
    from runtime.experts import plain_expert_ffn
    from tests.runtime.kernel_cases import make_expert

    spec = QuantSpec(2, 16, 4, 128)
    data, _ = packed((24, 256), spec, seed=7)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    ref = dequantize(component_tensors(buf, (24, 256), spec), (24, 256), spec, torch.float32)
    a = cpu_expert.dequantize_packed(buf, (24, 256), spec, 0, torch.float32, transient=True)
    assert torch.equal(a, ref)
    b = cpu_expert.dequantize_packed(buf, (8, 256), spec, 0, torch.float32, transient=True)
    assert b.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()  # one buffer, reused
    other = []
    t = threading.Thread(target=lambda: other.append(
        cpu_expert.dequantize_packed(buf, (24, 256), spec, 0, torch.float32, transient=True)))
    t.start()
    t.join()
    assert torch.equal(other[0], ref) and other[0].untyped_storage().data_ptr() != a.untyped_storage().data_ptr()

    layout, data, _ = make_expert(64, 128, QuantSpec(2, 16, 4, 128), seed=3)
    record = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    w = {m.name: cpu_expert.dequantize_packed(record, m.shape, m.spec, m.offset, torch.float32) for m in layout.matrices}
    want = F.linear(F.silu(F.linear(x, w["w1"])) * F.linear(x, w["w3"]), w["w2"])
    assert torch.equal(plain_expert_ffn(record, layout, x, torch.float32), want)
