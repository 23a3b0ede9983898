"""Where the runtime calls the compiled CPU kernel: experts (the one-call expert, the rows past
a split's cut, the fallback to numba or torch where the kernel declines), QuantLinear and
HalfLinear, the token limits that choose the kernel, numba or dequantize-then-matmul, and the
CPU default of keeping large models packed. The kernel itself: test_cpu_native.py; the shared
helpers: cpu_native_cases.py."""

from __future__ import annotations

import pytest
import torch

from formats.qtensor import QuantSpec
from runtime import cpu_expert, cpu_native
from runtime.cpu_expert import cpu_expert_ffn
from runtime.experts import plain_expert_ffn
from tests.runtime.cpu_native_cases import EXPERT_TOL, needs_native
from tests.runtime.kernel_cases import make_expert, packed


@needs_native
@pytest.mark.parametrize("spec,hidden", [(QuantSpec(2, 16, 16), 48), (QuantSpec(8, 64, 8, 64), 64),
                                         (QuantSpec(2, 24, 8, 128), 48)], ids=lambda v: str(v))
def test_expert_falls_back_where_the_kernel_declines(spec, hidden, monkeypatch):
    """fp16 meta, 8-bit codes, a half-word group: numba computes them (or plain torch)."""
    calls = []
    real = cpu_expert._numba_matvec
    monkeypatch.setattr(cpu_expert, "_numba_matvec", lambda *a: calls.append(1) or real(*a))
    layout, data, _ = make_expert(hidden, 2 * hidden, spec, seed=4)
    record = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    x = torch.randn(1, hidden, generator=torch.Generator().manual_seed(0))
    y = cpu_expert_ffn(record, layout, x)
    ref = plain_expert_ffn(record, layout, x, torch.float32)
    assert float((y - ref).norm() / ref.norm()) < 1e-5
    assert calls == ([1, 1, 1] if cpu_expert._numba() is not None else [])


@needs_native
def test_non_finite_input_falls_back_and_propagates():
    spec = QuantSpec(2, 16, 8, 128)
    layout, data, _ = make_expert(64, 128, spec, seed=5)
    record = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    x = torch.randn(1, 64)
    x[0, 3] = float("nan")
    assert torch.isnan(cpu_expert_ffn(record, layout, x)).all()


@needs_native
def test_expert_uses_the_native_kernel(monkeypatch):
    """The Mixtral default layout goes through the compiled kernel, not numba."""
    monkeypatch.setattr(cpu_expert, "_numba_matvec", lambda *a: pytest.fail("numba was used"))
    layout, data, _ = make_expert(64, 128, QuantSpec(2, 16, 8, 128), seed=6)
    record = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    x = 0.1 * torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    ref = plain_expert_ffn(record, layout, x, torch.float32)
    assert float((cpu_expert_ffn(record, layout, x, threads=2) - ref).norm() / ref.norm()) < EXPERT_TOL


@needs_native
def test_quant_linear_uses_a_kernel_for_a_few_tokens(monkeypatch):
    """QuantLinear on the CPU: the compiled kernel on the packed bytes for up to 256 tokens
    (NATIVE_MAX_TOKENS), numba for up to 64, the dequantize path beyond."""
    from runtime import qlinear
    from runtime.experts import CPU_KERNEL_MAX_TOKENS, NATIVE_MAX_TOKENS

    spec = QuantSpec(4, 64, 8, 256)
    data, w = packed((48, 256), spec, seed=8)
    lin = qlinear.QuantLinear(torch.frombuffer(bytearray(data), dtype=torch.uint8), (48, 256), spec, torch.float32)
    calls = []
    cpu_native.native_kernel()  # loaded (and self-checked) before the spy goes in
    real = cpu_native.NativeKernel.gemv
    monkeypatch.setattr(cpu_native.NativeKernel, "gemv",
                        lambda self, buf, d, x, t: calls.append(tuple(x.shape)) or real(self, buf, d, x, t))
    x = torch.randn(NATIVE_MAX_TOKENS + 4, 256, generator=torch.Generator().manual_seed(0))
    ref = x.double() @ torch.from_numpy(w).double().T

    def err(y, n):
        return float((y.double() - ref[:n]).norm() / ref[:n].norm())

    assert err(lin(x), len(x)) < 1e-5 and calls == []  # a long prompt: dequantize, then matmul
    y = lin(x[:CPU_KERNEL_MAX_TOKENS + 16].reshape(4, -1, 256))  # 80 rows in a batch shape: the compiled kernel
    assert calls == [(CPU_KERNEL_MAX_TOKENS + 16, 256)] and y.shape == (4, 20, 48)
    assert err(y.reshape(-1, 48), CPU_KERNEL_MAX_TOKENS + 16) < EXPERT_TOL
    # without the compiled kernel: numba through component views for a few tokens, then dequantize
    monkeypatch.setattr(cpu_expert, "_native", lambda: None)
    if cpu_expert._numba() is not None:
        assert err(lin(x[:2]), 2) < 1e-5 and len(calls) == 1
    assert err(lin(x[:CPU_KERNEL_MAX_TOKENS + 16]), CPU_KERNEL_MAX_TOKENS + 16) < 1e-5 and len(calls) == 1


@needs_native
def test_experts_take_the_compiled_kernel_up_to_its_limit(monkeypatch):
    """An expert's call goes to the compiled kernel for up to NATIVE_MAX_TOKENS tokens, to numba
    for up to CPU_KERNEL_MAX_TOKENS without it, and to dequantize-then-matmul beyond."""
    from runtime import experts
    from runtime.experts import CPU_KERNEL_MAX_TOKENS, NATIVE_MAX_TOKENS

    layout, data, _ = make_expert(256, 512, QuantSpec(2, 16, 4, 128), seed=2)
    record = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    for tokens, takes in ((1, True), (CPU_KERNEL_MAX_TOKENS + 1, True), (NATIVE_MAX_TOKENS, True),
                          (NATIVE_MAX_TOKENS + 1, False)):
        assert experts._cpu_kernel_applies(record, layout, torch.zeros(tokens, 256)) is takes, tokens
    monkeypatch.setattr(cpu_expert, "_native", lambda: None)
    if cpu_expert._numba() is not None:
        assert experts._cpu_kernel_applies(record, layout, torch.zeros(CPU_KERNEL_MAX_TOKENS, 256))
    assert not experts._cpu_kernel_applies(record, layout, torch.zeros(CPU_KERNEL_MAX_TOKENS + 1, 256))


def test_cpu_default_keeps_large_models_packed(monkeypatch, packed_files):
    from formats.reader import MoepackFile
    from runtime import generate

    file = MoepackFile(packed_files["4/2"])
    cpu = torch.device("cpu")
    assert generate.dense_on_cpu(file, cpu, torch.float32)  # tiny: dense is faster
    assert not generate.dense_on_cpu(file, torch.device("cuda"), torch.float16)
    monkeypatch.setattr(generate, "DENSE_CPU_LIMIT", 0)
    assert generate.dense_on_cpu(file, cpu, torch.float32) == (not cpu_expert.cpu_expert_available())
    monkeypatch.setattr(cpu_expert, "cpu_expert_available", lambda: False)
    assert generate.dense_on_cpu(file, cpu, torch.float32)  # no kernel: dense


@needs_native
@pytest.mark.parametrize("spec,hidden,inter", [(QuantSpec(2, 16, 8, 128), 64, 128), (QuantSpec(3, 64, 8, 128), 128, 192),
                                               (QuantSpec(4, 32, 8, 24), 64, 96), (QuantSpec(2, 16, 8, 5), 48, 80),
                                               (QuantSpec(2, 16, 4, 128), 64, 128), (QuantSpec(3, 64, 4, 7), 128, 192)],
                         ids=lambda v: v.describe() if isinstance(v, QuantSpec) else str(v))
@pytest.mark.parametrize("tokens", [1, 3])
def test_one_call_expert(spec, hidden, inter, tokens, monkeypatch):
    """moepack_expert (w1, w3, silu-gate and w2 in one call, x rounded once for w1 and w3)
    against the exact expert, and its first two thirds (the split's h) against silu(w1 x) * w3 x."""
    from runtime.cpu_expert import cpu_expert_hidden

    layout, data, ref = make_expert(hidden, inter, spec, seed=9)
    assert cpu_native.expert_descriptor(layout) is not None
    monkeypatch.setattr(cpu_expert, "_matvec", lambda *a: pytest.fail("the per-matrix path ran"))
    record = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    x = 0.1 * torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens))
    h_ref = torch.nn.functional.silu(x.double() @ torch.from_numpy(ref["w1"]).double().T) * (
        x.double() @ torch.from_numpy(ref["w3"]).double().T)
    y_ref = h_ref @ torch.from_numpy(ref["w2"]).double().T
    h = cpu_expert_hidden(record, layout, x, threads=2)
    y = cpu_expert_ffn(record, layout, x, threads=2)
    assert h.shape == (tokens, inter) and y.shape == (tokens, hidden)
    assert float((h.double() - h_ref).norm() / h_ref.norm()) < EXPERT_TOL
    assert float((y.double() - y_ref).norm() / y_ref.norm()) < EXPERT_TOL
    assert torch.equal(y, cpu_expert_ffn(record, layout, x, threads=1))  # rows split over threads: same sums


@needs_native
@pytest.mark.parametrize("spec,hidden,inter", [(QuantSpec(2, 16, 8, 128), 64, 256), (QuantSpec(3, 64, 8, 128), 128, 384),
                                               (QuantSpec(2, 16, 4, 128), 64, 256), (QuantSpec(3, 64, 4, 4), 128, 192)],
                         ids=lambda v: v.describe() if isinstance(v, QuantSpec) else str(v))
def test_hidden_of_the_rows_past_a_cut(spec, hidden, inter, monkeypatch):
    """cpu_expert_hidden(first_row=r): the compiled kernel on w1's and w3's rows r.. alone
    (cpu_native.rows_descriptor) gives those rows of the whole matrices' products, bit for bit."""
    from runtime.cpu_expert import cpu_expert_hidden
    from runtime.dequant import row_prefix_ok

    layout, data, _ = make_expert(hidden, inter, spec, seed=4)
    record = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    x = 0.1 * torch.randn(2, hidden, generator=torch.Generator().manual_seed(2))
    xs = x.numpy()
    # the per-matrix path over whole matrices (the one-call kernel's silu differs in the last bit)
    w3 = torch.from_numpy(cpu_expert._matvec(record, layout.matrix("w3"), xs, 2))
    whole = torch.nn.functional.silu(torch.from_numpy(cpu_expert._matvec(record, layout.matrix("w1"), xs, 2))) * w3
    cuts = [r for r in range(1, inter) if row_prefix_ok(r, hidden, spec)]
    assert cuts
    monkeypatch.setattr(cpu_expert, "_matvec", lambda *a: pytest.fail("the whole matrix ran"))
    for r in cuts[:: max(1, len(cuts) // 4)]:
        # the products bit for bit; torch's silu may round a vector lane and a scalar tail apart
        assert torch.equal(torch.from_numpy(cpu_expert._matvec_rows(record, layout.matrix("w3"), r, xs, 2)), w3[:, r:])
        torch.testing.assert_close(cpu_expert_hidden(record, layout, x, threads=2, first_row=r), whole[:, r:],
                                   rtol=1e-6, atol=0)


@needs_native
def test_descriptor_declines_what_the_kernel_cannot_take():
    layout, _, _ = make_expert(48, 96, QuantSpec(2, 16, 16), seed=1)  # fp16 meta
    assert cpu_native.expert_descriptor(layout) is None
    layout, _, _ = make_expert(64, 128, QuantSpec(8, 64, 8, 64), seed=1)  # 8-bit codes
    assert cpu_native.expert_descriptor(layout) is None


@needs_native
def test_half_linear_keeps_fp16_and_computes_in_float32():
    from runtime.qlinear import HalfLinear

    w = torch.randn(40, 100).half()
    w[0, :3] = torch.tensor([6e-8, -6e-8, 0.0]).half()  # fp16 subnormals and zero
    lin = HalfLinear(w, torch.float32)
    x = torch.randn(3, 100)
    ref = x.double() @ w.double().T
    y = lin(x)
    assert y.dtype == torch.float32 and float((y.double() - ref).norm() / ref.norm()) < 1e-6
    many = torch.randn(70, 100)  # more rows than the kernel takes: widened per call
    assert torch.allclose(lin(many), many @ w.float().T, rtol=1e-5, atol=1e-5)


@needs_native
def test_large_fp16_matrices_stay_fp16_on_the_cpu(monkeypatch, packed_files):
    """With the size limit at 0, the tiny 4/3 file's fp16 lm_head loads as HalfLinear and the
    model's logits do not move."""
    from runtime import qlinear
    from runtime.loader import load_model

    path = packed_files["4/3"]
    ref, _ = load_model(path, "cpu", torch.float32, ctx=32)
    monkeypatch.setattr(qlinear, "HALF_CPU_LIMIT", 0)
    got, _ = load_model(path, "cpu", torch.float32, ctx=32)
    assert isinstance(got.lm_head, qlinear.HalfLinear) and not isinstance(ref.lm_head, qlinear.HalfLinear)
    tokens = torch.tensor([1, 5, 9])
    a, b = ref(tokens, 0, last_only=True), got(tokens, 0, last_only=True)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


@needs_native
def test_quant_linear_propagates_non_finite_input():
    """The compiled kernel declines a non-finite x (its int16 rounding needs finite values) and
    the float path propagates it, as for experts."""
    from runtime import qlinear

    spec = QuantSpec(4, 64, 8, 256)
    data, _ = packed((48, 256), spec, seed=8)
    lin = qlinear.QuantLinear(torch.frombuffer(bytearray(data), dtype=torch.uint8), (48, 256), spec, torch.float32)
    x = torch.randn(1, 256)
    x[0, 7] = float("nan")
    assert torch.isnan(lin(x)).all()
