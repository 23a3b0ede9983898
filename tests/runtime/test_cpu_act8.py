"""The compiled CPU kernel's int8 activations (runtime/csrc/qgemv_cpu.c, quantize_x_word8;
row_fast.h's byte path): the default (auto) for a model wholly on the CPU, int16 beside a GPU
(--hybrid), either on request (runtime.cpu_native.set_cpu_activations, MOEPACK_CPU_ACT); on the
fast path's default geometries, int16 everywhere else.

x is rounded per word of codes to integer steps of the word's largest |x| / 127, and the rest is
exact, so each result is checked against dequant(W) @ x^ with that rounding done in numpy
(tight: float32 sums only) and against dequant(W) @ x (loose: 2^-8 of each word's largest |x|).
The 16-lane rows' byte path: test_cpu_wide.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from formats.qtensor import QuantSpec
from runtime import cpu_native
from runtime.loader import load_model
from tests.runtime.cpu_native_cases import (CASES, INT8_DEFAULTS, assert_tokens_batch_exactly, check_expert_and_row_cut,
                                            needs_native, quantize_x, rel, run, takes_int8, x_steps)
from tests.runtime.kernel_cases import make_expert, packed

pytestmark = needs_native


@pytest.fixture(scope="module")
def act8():
    """The loaded kernel with int8 activations on (an AVX2 build: the byte path is vector code
    only); the switch and the module's choice as they were after the module. A test that
    switches it leaves it on."""
    kernel = cpu_native.native_kernel()
    if not kernel.avx2:
        pytest.skip("int8 activations are built for AVX2 only")
    saved = kernel.act8, cpu_native._activations
    try:
        cpu_native.set_cpu_activations("int8")
        assert kernel.act8
        yield kernel
    finally:
        kernel.set_act8(saved[0])
        cpu_native._activations = saved[1]


def steps_for(kernel, spec, shape) -> int:
    """The integer steps per word that the kernel uses for this matrix now."""
    return 127 if kernel.uses_act8(cpu_native.matrix_descriptor(shape, spec)) else x_steps(spec.bits)




@pytest.mark.parametrize("spec,n,k", CASES, ids=lambda v: v.describe() if isinstance(v, QuantSpec) else str(v))
@pytest.mark.parametrize("tokens", [1, 2, 5])
def test_matches_the_int8_rounded_reference(act8, spec, n, k, tokens):
    """Every geometry of the int16 tests: the byte path where fast_default takes it (tails, part
    blocks and blocks across meta groups included), int16 where it does not."""
    data, w = packed((n, k), spec, seed=n + k + spec.bits)
    x = np.random.default_rng(tokens).standard_normal((tokens, k)).astype(np.float32)
    x[:, :16] *= 50  # one word of large activations: each word keeps its own scale
    y = assert_tokens_batch_exactly(lambda *a: run(*a, threads=2), data, (n, k), spec, x)
    steps = steps_for(act8, spec, (n, k))
    assert (steps == 127) == takes_int8(spec, k)
    cu = 8 if spec.bits == 4 else 16
    assert rel(y, quantize_x(x, cu, steps) @ w.astype(np.float64).T) < 2e-6
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    assert rel(y, exact) < (2e-2 if steps == 127 else 1e-4 * 32767 / steps)


@settings(max_examples=40, deadline=None)
@given(default=st.sampled_from(INT8_DEFAULTS), groups=st.integers(8, 40), rows=st.integers(1, 40),
       mg=st.sampled_from([8, 9, 16, 24, 128, 300]), tokens=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_any_default_geometry_matches_the_int8_rounded_reference(act8, default, groups, rows, mg, tokens, seed):
    """Row widths of any number of groups (part blocks) and meta groups of any size (blocks
    across two), several tokens per pass."""
    spec = QuantSpec(*default, mg)
    k = spec.group_size * groups
    assert act8.uses_act8(cpu_native.matrix_descriptor((rows, k), spec)) == takes_int8(spec, k)
    data, w = packed((rows, k), spec, seed=seed)
    x = np.random.default_rng(seed).standard_normal((tokens, k)).astype(np.float32)
    y = run(data, (rows, k), spec, x, threads=2)
    xq = quantize_x(x, 8 if spec.bits == 4 else 16, steps_for(act8, spec, (rows, k)))
    ref = xq @ w.astype(np.float64).T
    assert np.all(np.abs(y - ref) <= 1e-5 * (np.abs(xq) @ np.abs(w.astype(np.float64)).T) + 1e-9)


def test_int8_is_coarser_than_int16_and_only_while_on(act8):
    """The switch changes the result (so the tests above ran the byte path), and off again the
    kernel is the int16 one bit for bit."""
    spec = QuantSpec(2, 16, 4, 128)
    data, w = packed((64, 1024), spec, seed=5)
    x = np.random.default_rng(0).standard_normal((1, 1024)).astype(np.float32)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    y8 = run(data, (64, 1024), spec, x)
    act8.set_act8(False)
    y16 = run(data, (64, 1024), spec, x)
    act8.set_act8(True)
    assert 5 * rel(y16, exact) < rel(y8, exact) < 2e-2
    try:
        cpu_native.set_cpu_activations("int16")
        assert np.array_equal(run(data, (64, 1024), spec, x), y16)
    finally:
        cpu_native.set_cpu_activations("int8")


def test_tiny_zero_and_non_finite_words(act8):
    """As the int16 path: a word of subnormals or zeros adds nothing; a word of w2's input h
    holding an inf makes the sums NaN, not finite garbage."""
    spec = QuantSpec(2, 16, 8, 128)
    data, w = packed((8, 256), spec, seed=3)
    x = np.random.default_rng(1).standard_normal((1, 256)).astype(np.float32)
    x[0, :16] = 1e-40
    x[0, 16:32] = 0.0
    xr = x.copy()
    xr[0, :32] = 0.0
    y = run(data, (8, 256), spec, x)
    assert np.isfinite(y).all() and np.allclose(y, quantize_x(xr, 16, 127) @ w.astype(np.float64).T, rtol=1e-5, atol=1e-5)
    layout, record, _ = make_expert(256, 1024, spec, seed=7)
    big = torch.full((1, 256), 3e38)
    big[0, ::2] = -3e38
    h, y = act8.expert(torch.frombuffer(bytearray(record), dtype=torch.uint8), cpu_native.expert_descriptor(layout), big,
                       1024, 256, 1)
    assert not torch.isfinite(h).all() and torch.isnan(y).all()


@pytest.mark.parametrize("spec", [QuantSpec(2, 16, 4, 128), QuantSpec(3, 64, 8, 128)], ids=QuantSpec.describe)
def test_one_call_expert_close_to_the_float_expert(act8, spec):
    """A whole expert (two matrices, the second on the first's rounded output) stays within int8's
    rounding of the exact value; its row cut is the same rows bit for bit. And it is int8's
    rounding: h is silu(w1 x^) * w3 x^ for x rounded to 127 steps per word, and y is w2 times h
    rounded the same way, both within float32 sums."""
    x = 0.1 * torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    check_expert_and_row_cut(act8, spec, 256, 512, x, 3e-2)
    layout, data, ref = make_expert(256, 512, spec, seed=7)
    h, y = act8.expert(torch.frombuffer(bytearray(data), dtype=torch.uint8), cpu_native.expert_descriptor(layout), x,
                       512, 256, 2)
    xq = torch.from_numpy(quantize_x(x.numpy(), 16, steps_for(act8, spec, (512, 256))))
    h_ref = torch.nn.functional.silu(xq @ torch.from_numpy(ref["w1"]).double().T) * (xq @ torch.from_numpy(ref["w3"]).double().T)
    assert steps_for(act8, spec, (256, 512)) == 127  # w2 (8 or more groups per row) on the byte path at least
    y_ref = torch.from_numpy(quantize_x(h.numpy(), 16, 127)) @ torch.from_numpy(ref["w2"]).double().T
    assert float((h.double() - h_ref).norm() / h_ref.norm()) < 1e-5
    assert float((y.double() - y_ref).norm() / y_ref.norm()) < 1e-5


def test_the_self_check_passes_on_the_byte_path(act8):
    assert cpu_native.self_check(act8) is None


@pytest.fixture
def switch(auto_activations):
    """The loaded kernel, starting with no request (auto) and int8 not yet checked."""
    return auto_activations


def test_the_switch_and_its_environment_variable(switch, monkeypatch):
    with pytest.raises(ValueError, match="int4.*int16, int8, auto"):
        cpu_native.set_cpu_activations("int4")
    monkeypatch.setenv("MOEPACK_CPU_ACT", "auto")
    cpu_native.set_auto_activations(True)
    assert cpu_native.cpu_activations() == "int8"
    cpu_native.set_auto_activations(False)
    assert cpu_native.cpu_activations() == "int16"
    monkeypatch.setenv("MOEPACK_CPU_ACT", "int8")
    assert cpu_native.cpu_activations() == "int8"
    cpu_native._apply_activations(switch)
    assert switch.act8 == switch.avx2
    monkeypatch.setenv("MOEPACK_CPU_ACT", "fp8")
    with pytest.warns(UserWarning, match="MOEPACK_CPU_ACT='fp8'.*using int16"):
        cpu_native._apply_activations(switch)
    assert not switch.act8


def test_a_failing_int8_check_keeps_int16(switch, monkeypatch):
    """The byte path is checked like the 16-lane rows when it is switched on (VNNI's vpdpbusd
    never ran on a CI machine): wrong results switch it off with a warning, not the kernel."""
    if not switch.avx2:
        pytest.skip("int8 activations are built for AVX2 only")
    monkeypatch.setattr(cpu_native, "self_check", lambda k: "int8 rows off by 1" if k.act8 else None)
    with pytest.warns(UserWarning, match="int8 activations give wrong results.*using int16"):
        cpu_native.set_cpu_activations("int8")
    assert not switch.act8


def test_a_cpu_model_rounds_to_int8_and_the_hybrid_to_int16(switch, tmp_path):
    """auto: the loader asks for int8 when the whole model runs on the CPU, and the hybrid engine
    for int16 before it times its CPU experts (they must match the GPU path's); a request (the
    option, or MOEPACK_CPU_ACT) wins over both."""
    from tests.runtime.offload_cases import LAYERS, offloaded
    from tests.runtime.test_offload_helpers import tiny_file

    path = tiny_file(tmp_path, LAYERS, 8)
    load_model(path, "cpu", torch.float32, ctx=32)
    assert cpu_native.cpu_activations() == "int8" and switch.act8 == switch.avx2
    assert cpu_native.cpu_activations_in_use() == ("int8" if switch.avx2 else "int16")
    offloaded(path, hybrid=True, cpu_threads=1)
    assert cpu_native.cpu_activations() == "int16" and not switch.act8
    offloaded(path)  # offloaded on the CPU without --hybrid: nothing to match, int8 again
    assert switch.act8 == switch.avx2
    cpu_native.set_cpu_activations("int16")
    load_model(path, "cpu", torch.float32, ctx=32)
    assert not switch.act8
    cpu_native.set_cpu_activations("int8")
    offloaded(path, hybrid=True, cpu_threads=1)
    assert switch.act8 == switch.avx2


def test_each_model_steps_with_its_own_rounding(switch, tmp_path):
    """Models loaded one after another: a CPU model after a hybrid one, and the hybrid one run
    again, each step with its own auto rounding, not the last loaded model's."""
    from tests.runtime.offload_cases import LAYERS, offloaded
    from tests.runtime.test_offload_helpers import tiny_file

    path = tiny_file(tmp_path, LAYERS, 8)
    hybrid = offloaded(path, hybrid=True, cpu_threads=1)
    cpu = load_model(path, "cpu", torch.float32, ctx=32)[0]
    assert switch.act8 == switch.avx2
    seen = []
    real = cpu_native.NativeKernel.expert

    def spy(self, *a, **kw):
        seen.append(self.act8)
        return real(self, *a, **kw)

    tokens = torch.tensor([3, 1, 4, 1, 5])
    with pytest.MonkeyPatch.context() as m:
        m.setattr(cpu_native.NativeKernel, "expert", spy)
        hybrid(tokens, 0)
        assert seen and not any(seen)  # int16 for the hybrid's CPU experts
        seen.clear()
        cpu(tokens, 0)
        assert seen and all(a == switch.avx2 for a in seen)
        seen.clear()
        hybrid(tokens, 0)
        assert not any(seen)


def test_int8s_self_check_runs_once_per_kernel(switch, monkeypatch):
    """Models loaded one after another switch int8 on and off; its check runs the first time."""
    if not switch.avx2:
        pytest.skip("int8 activations are built for AVX2 only")
    calls = []
    monkeypatch.setattr(cpu_native, "self_check", lambda k: calls.append(k.act8))
    for cpu_only in (True, False, True, True):
        cpu_native.set_auto_activations(cpu_only)
        assert switch.act8 == cpu_only
    assert calls == [True]
