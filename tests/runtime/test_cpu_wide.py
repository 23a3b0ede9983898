"""The compiled CPU kernel's 16-lane rows (runtime/csrc/vec.h, row_fast.h): AVX-512 where the
compiler targets it, which no CI machine has. Built here with MP_EMULATE_WIDE, the same 16-lane
code runs on two 8-lane halves, so everything but the intrinsics' one-to-one mapping is checked:
blocks of 16 words and groups, x in blocks of 16, the lane permute of multi-word groups, both
meta widths, the one-call expert and its row cut. And the loader: a 16-lane build that fails its
self-check falls back to 8 lanes, not to numba."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from formats.qtensor import QuantSpec
from runtime import cpu_build, cpu_native
from tests.runtime.cpu_native_cases import (EXPERT_TOL, assert_tokens_batch_exactly, check_expert_and_row_cut, quantize_x,
                                            rel, takes_int8, x_steps)
from tests.runtime.kernel_cases import packed


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """The kernel built with 16-lane rows emulated on AVX2."""
    native = cpu_native.native_kernel()
    if native is None or not native.avx2:
        pytest.skip("needs the compiled kernel on an AVX2 machine")
    # the build's own flag sets that target this CPU (with OpenMP where the compiler has it)
    sets = [f + ["-DMP_EMULATE_WIDE"] for f in cpu_build._flag_sets() if "-march=native" in f]
    mp = pytest.MonkeyPatch()
    mp.setattr(cpu_build, "_flag_sets", lambda: sets)
    try:
        kernel = cpu_native.NativeKernel(cpu_build.build(out_dir=tmp_path_factory.mktemp("wide")))
    finally:
        mp.undo()
    assert kernel.wide
    return kernel


def gemv(kernel, data, shape, spec, x, threads=2):
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return kernel.gemv(buf, cpu_native.matrix_descriptor(shape, spec), torch.from_numpy(x), threads).numpy()


def test_passes_the_load_time_check(wide):
    assert cpu_native.self_check(wide) is None


# (spec, N, K) with 16 | groups per row and 16 | meta group (the 16-lane rows): every code width,
# both meta widths, 1, 2, 4 and 16 words per group (the lane permute), several meta groups per row
WIDE_CASES = [
    (QuantSpec(2, 16, 8, 128), 24, 512),
    (QuantSpec(2, 16, 4, 128), 24, 512),
    (QuantSpec(2, 32, 8, 64), 16, 1024),
    (QuantSpec(2, 256, 4, 16), 8, 4096),
    (QuantSpec(3, 64, 8, 128), 24, 1024),
    (QuantSpec(3, 64, 4, 32), 16, 2048),
    (QuantSpec(4, 64, 8, 256), 16, 1024),
    (QuantSpec(4, 8, 4, 16), 8, 256),
    (QuantSpec(2, 16, 4, 128), 40, 8192),  # long rows: 512 groups, 4 meta groups each
]


@pytest.mark.parametrize("spec,n,k", WIDE_CASES, ids=lambda v: v.describe() if isinstance(v, QuantSpec) else str(v))
@pytest.mark.parametrize("tokens", [1, 3, 5])
def test_matches_the_rounded_reference(wide, spec, n, k, tokens):
    data, w = packed((n, k), spec, seed=n + k)
    x = np.random.default_rng(tokens).standard_normal((tokens, k)).astype(np.float32)
    x[:, :16] *= 50  # one word of large activations: each word keeps its own scale
    y = assert_tokens_batch_exactly(lambda *a: gemv(wide, *a), data, (n, k), spec, x)
    cu = 8 if spec.bits == 4 else 16
    assert rel(y, quantize_x(x, cu, x_steps(spec.bits)) @ w.astype(np.float64).T) < 2e-6


@pytest.mark.parametrize("spec,n,k", WIDE_CASES, ids=lambda v: v.describe() if isinstance(v, QuantSpec) else str(v))
def test_int8_activations_match_their_rounded_reference(wide, spec, n, k):
    """The byte path (test_cpu_act8.py) on 16-lane rows: x's bytes in blocks of 16 words."""
    data, w = packed((n, k), spec, seed=n + k)
    x = np.random.default_rng(n).standard_normal((5, k)).astype(np.float32)
    x[:, :16] *= 50
    cu = 8 if spec.bits == 4 else 16
    try:
        assert wide.set_act8(True)
        steps = 127 if wide.uses_act8(cpu_native.matrix_descriptor((n, k), spec)) else x_steps(spec.bits)
        y = assert_tokens_batch_exactly(lambda *a: gemv(wide, *a), data, (n, k), spec, x)
    finally:
        wide.set_act8(False)
    assert (steps == 127) == takes_int8(spec, k)
    assert rel(y, quantize_x(x, cu, steps) @ w.astype(np.float64).T) < 2e-6


def test_int8_passes_the_load_time_check(wide):
    try:
        wide.set_act8(True)
        assert cpu_native.self_check(wide) is None
    finally:
        wide.set_act8(False)


@pytest.mark.parametrize("spec,n,k,takes_wide", [(QuantSpec(2, 16, 8, 128), 16, 256, True),
                                                 (QuantSpec(2, 16, 8, 128), 16, 128, False),  # 8 groups per row
                                                 (QuantSpec(2, 16, 8, 8), 16, 256, False)])  # meta groups of 8
def test_sixteen_lane_rows_run_where_the_shape_allows(wide, spec, n, k, takes_wide):
    """The lanes sum in another order, so the 16-lane and 8-lane rows differ in the last bits
    exactly where the 16-lane rows apply (16 groups per row, meta groups of 16 or more)."""
    data, _ = packed((n, k), spec, seed=3)
    x = np.random.default_rng(0).standard_normal((1, k)).astype(np.float32)
    wide_y = gemv(wide, data, (n, k), spec, x)
    try:
        assert not wide.set_wide(False)
        narrow_y = gemv(wide, data, (n, k), spec, x)
    finally:
        assert wide.set_wide(True)
    assert np.array_equal(wide_y, narrow_y) != takes_wide
    np.testing.assert_allclose(wide_y, narrow_y, rtol=1e-5, atol=1e-6)


@given(bits=st.sampled_from([2, 3, 4]), words_per_group=st.sampled_from([1, 2, 4, 8]), blocks=st.integers(1, 3),
       rows=st.integers(1, 20), mg_blocks=st.integers(1, 4), seed=st.integers(0, 2**16), meta_bits=st.sampled_from([8, 4]))
@settings(max_examples=40, deadline=None)
def test_any_wide_geometry_matches_the_rounded_reference(wide, bits, words_per_group, blocks, rows, mg_blocks, seed,
                                                         meta_bits):
    cu = 8 if bits == 4 else 16
    spec = QuantSpec(bits, cu * words_per_group, meta_bits, 16 * mg_blocks)
    k = spec.group_size * 16 * blocks
    data, w = packed((rows, k), spec, seed=seed)
    x = np.random.default_rng(seed).standard_normal((2, k)).astype(np.float32)
    y = gemv(wide, data, (rows, k), spec, x)
    xq = quantize_x(x, cu, x_steps(bits))
    ref = xq @ w.astype(np.float64).T
    assert np.all(np.abs(y - ref) <= 1e-5 * (np.abs(xq) @ np.abs(w.astype(np.float64)).T) + 1e-9)


@pytest.mark.parametrize("spec", [QuantSpec(2, 16, 4, 128), QuantSpec(3, 64, 8, 128)], ids=QuantSpec.describe)
def test_one_call_expert_and_its_row_cut(wide, spec):
    """moepack_expert on 16-lane rows (w1/w3: 16 groups per row at hidden 256 or 1024; w2 too),
    whole and from a row cut (the hybrid split's CPU rows)."""
    hidden = 16 * spec.group_size
    x = 0.1 * torch.randn(2, hidden, generator=torch.Generator().manual_seed(1))
    check_expert_and_row_cut(wide, spec, hidden, 2 * hidden, x, EXPERT_TOL)


@pytest.fixture
def loads_wide(wide, monkeypatch):
    """native_kernel() loading the 16-lane build, uncached; its switch is back on after (one
    library, loaded once per process: the switch is shared)."""
    monkeypatch.setattr(cpu_native, "build", lambda *a, **k: wide.path)
    cpu_native.native_kernel.cache_clear()
    yield wide
    cpu_native.native_kernel.cache_clear()
    wide.set_wide(True)


def test_a_failing_wide_build_falls_back_to_eight_lanes(loads_wide, monkeypatch):
    monkeypatch.setattr(cpu_native, "self_check", lambda kernel: "16-lane rows off by 1" if kernel.wide else None)
    with pytest.warns(UserWarning, match="16-lane rows give wrong results.*8-lane"):
        kernel = cpu_native.native_kernel()
    assert kernel is not None and not kernel.wide


def test_a_failing_wide_build_keeps_int8_activations(loads_wide, monkeypatch):
    """The 8-lane fallback still applies the requested int8 activations (it once returned before
    they were applied)."""
    monkeypatch.setattr(cpu_native, "self_check", lambda kernel: "16-lane rows off by 1" if kernel.wide else None)
    monkeypatch.setattr(cpu_native, "_activations", None)
    monkeypatch.setenv("MOEPACK_CPU_ACT", "int8")
    try:
        with pytest.warns(UserWarning, match="8-lane"):
            kernel = cpu_native.native_kernel()
        assert not kernel.wide and kernel.act8 and cpu_native.cpu_activations_in_use() == "int8"
    finally:
        loads_wide.set_act8(False)


def test_failing_sixteen_lane_int8_rows_fall_back_to_eight_lane_int8(loads_wide, monkeypatch):
    """int8 whose 16-lane rows fail the check (vpdpbusd never ran on a CI machine) keeps int8 on
    the 8-lane rows, and int16 keeps the 16-lane rows that passed. The lanes sum in another
    order, so a row's result tells which rows ran (test_sixteen_lane_rows_run_where_the_shape_allows)."""
    spec, n, k = QuantSpec(2, 16, 8, 128), 16, 256  # 16 groups per row: 16 lanes where allowed
    data, _ = packed((n, k), spec, seed=3)
    x = np.random.default_rng(0).standard_normal((1, k)).astype(np.float32)

    def same_on_both_widths(kernel):
        wide_y = gemv(kernel, data, (n, k), spec, x)
        loads_wide.set_wide(False)  # the switch is the library's: any handle to it sets it
        try:
            return np.array_equal(wide_y, gemv(kernel, data, (n, k), spec, x))
        finally:
            loads_wide.set_wide(True)

    try:
        assert loads_wide.set_act8(True) and not same_on_both_widths(loads_wide)  # int8 on 16 lanes, as built
        monkeypatch.setattr(cpu_native, "self_check",
                            lambda kernel: "16-lane int8 rows off by 1" if kernel.act8 and kernel.act8_wide else None)
        monkeypatch.setattr(cpu_native, "_activations", None)
        monkeypatch.setenv("MOEPACK_CPU_ACT", "int8")
        with pytest.warns(UserWarning, match="16-lane int8 rows give wrong results.*8-lane int8"):
            kernel = cpu_native.native_kernel()
        assert kernel.wide and kernel.act8 and not kernel.act8_wide and kernel.act8_problem is None
        assert kernel.uses_act8(cpu_native.matrix_descriptor((n, k), spec)) and same_on_both_widths(kernel)
        cpu_native.set_cpu_activations("int16")
        assert not kernel.act8 and not same_on_both_widths(kernel)  # int16 keeps its 16 lanes
        cpu_native.set_cpu_activations("int8")  # back to int8 without a second check, on 8 lanes
        assert kernel.act8 and same_on_both_widths(kernel)
    finally:
        monkeypatch.setattr(cpu_native, "_activations", None)
        loads_wide.set_act8(False)


def test_environment_keeps_to_eight_lanes(loads_wide, monkeypatch):
    monkeypatch.setenv("MOEPACK_CPU_WIDE", "0")
    assert not cpu_native.native_kernel().wide
