"""runtime.cpu_native: the compiled CPU kernel (runtime/csrc/qgemv_cpu.c) against the exact
dequantized matrix, on every path inside it (the in-register meta fast path, the per-row decode
path, the scalar tails), its refusals, and its build and fallback behaviour. Several tokens per
pass and its dequantization: test_cpu_native_prompt.py; the experts and linear layers that call
it: test_cpu_native_callers.py; the shared helpers: cpu_native_cases.py.

The kernel rounds x to integers per 32-bit word of codes (scale: the word's largest |x| / 32767,
or / 6553 for 2-bit codes, whose pairs are telescoped) and is otherwise exact, so it is checked
twice: against dequant(W) @ x^ with x^ that rounding done in numpy (tight: float32 summation
only), and against dequant(W) @ x (loose: 2^-16 or 2^-13.7 of each word's largest |x|)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from formats.qtensor import QuantSpec
from runtime import cpu_build, cpu_native
from runtime.cpu_expert import cpu_expert_ffn
from runtime.experts import plain_expert_ffn
from tests.runtime.cpu_native_cases import CASES, needs_native, quantize_x, rel, run, x_steps
from tests.runtime.kernel_cases import make_expert, packed


@needs_native
@pytest.mark.parametrize("spec,n,k", CASES, ids=lambda v: v.describe() if isinstance(v, QuantSpec) else str(v))
@pytest.mark.parametrize("tokens", [1, 3])
def test_matches_dequantized_matrix(spec, n, k, tokens):
    data, w = packed((n, k), spec, seed=n + k + spec.bits)
    rng = np.random.default_rng(tokens)
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    x[:, :16] *= 50  # a few large activations: each word keeps its own scale
    y = run(data, (n, k), spec, x)
    assert y.shape == (tokens, n) and y.dtype == np.float32
    cu = 8 if spec.bits == 4 else 16
    assert rel(y, quantize_x(x, cu, x_steps(spec.bits)) @ w.astype(np.float64).T) < 2e-6
    assert rel(y, x.astype(np.float64) @ w.astype(np.float64).T) < 1e-4 * 32767 / x_steps(spec.bits)


@needs_native
def test_threads_give_the_same_result():
    spec = QuantSpec(3, 64, 8, 128)
    data, _ = packed((72, 512), spec, seed=1)
    x = np.random.default_rng(0).standard_normal((2, 512)).astype(np.float32)
    assert np.array_equal(run(data, (72, 512), spec, x, threads=1), run(data, (72, 512), spec, x, threads=2))


@needs_native
def test_zero_input_gives_zero():
    spec = QuantSpec(2, 16, 8, 128)
    data, _ = packed((16, 256), spec, seed=2)
    assert not run(data, (16, 256), spec, np.zeros((1, 256), np.float32)).any()


@needs_native
@pytest.mark.parametrize("bits,group", [(8, 64), (2, 8), (2, 24), (4, 4)])
def test_declines_what_it_does_not_cover(bits, group):
    """8-bit codes, and groups that are not whole 32-bit words of codes: None, the caller falls back."""
    native = cpu_native.native_kernel()
    k = 48 * group
    if group % 8 == 0:  # a valid spec: the descriptor already says no (group 4 is no spec at all)
        assert cpu_native.matrix_descriptor((4, k), QuantSpec(bits, group, 8, 8)) is None
    buf = torch.zeros(1 << 16, dtype=torch.uint8)  # the C side refuses the same geometry on its own
    assert native.gemv(buf, (0, -1, 0, 0, 0, 0, 8, group, 4, k, bits, 8), torch.ones(1, k), 1) is None


@needs_native
@pytest.mark.parametrize("meta_bits", [16, 2, 0])
def test_declines_meta_codes_it_does_not_read(meta_bits):
    buf = torch.zeros(1 << 16, dtype=torch.uint8)
    assert cpu_native.native_kernel().gemv(buf, (0, -1, 0, 0, 0, 0, 8, 16, 4, 256, 2, meta_bits), torch.ones(1, 256), 1) is None


def test_environment_switch_disables_it(monkeypatch):
    monkeypatch.setenv("MOEPACK_CPU_KERNEL", "numba")
    cpu_native.native_kernel.cache_clear()
    try:
        assert cpu_native.native_kernel() is None
    finally:
        cpu_native.native_kernel.cache_clear()


def test_a_broken_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEPACK_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exits 1 on every flag set
    cpu_native.native_kernel.cache_clear()
    try:
        with pytest.warns(UserWarning, match="CPU kernel not built"):
            assert cpu_native.native_kernel() is None
        assert not list(tmp_path.rglob("*.so"))  # no partial library left behind
        layout, data, _ = make_expert(48, 96, QuantSpec(2, 16, 8, 128), seed=7)
        record = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        x = torch.randn(1, 48)
        ref = plain_expert_ffn(record, layout, x, torch.float32)
        assert float((cpu_expert_ffn(record, layout, x) - ref).norm() / ref.norm()) < 1e-5
    finally:
        cpu_native.native_kernel.cache_clear()


def test_a_build_says_why_the_first_run_waits_only_on_a_terminal(monkeypatch, capsys, tmp_path):
    """The one-time compile (~20 s on 2 cores) prints a line on a terminal's stderr, and nothing
    where stderr is a pipe or captured (a CLI's one-line errors stay one line)."""
    monkeypatch.setattr(cpu_build.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("stub")))
    for tty in (False, True):
        monkeypatch.setattr(cpu_build.sys.stderr, "isatty", lambda: tty)
        with pytest.raises(cpu_build.NativeBuildError, match="stub"):
            cpu_build.build(cc="cc", out_dir=tmp_path)
        err = capsys.readouterr().err
        assert ("compiling the CPU kernel" in err) == tty


def test_no_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(cpu_build, "_compiler", lambda: None)
    with pytest.raises(cpu_build.NativeBuildError, match="no C compiler"):
        cpu_build.build()


def test_the_sources_build_where_there_is_a_compiler(tmp_path):
    """Without a compiler the runtime falls back and the kernel's tests skip. With one, a source
    that does not compile must fail here rather than turn every kernel test into a skip (the
    fallback's warning is easy to miss in CI). A second build of the same sources, compiler and
    CPU is the first one's file, untouched (one build: each takes ~20 s on CI's 2 cores)."""
    if cpu_build._compiler() is None:
        pytest.skip("no C compiler")
    first = cpu_build.build(out_dir=tmp_path)
    assert first.exists()
    stamp = first.stat().st_mtime_ns
    assert cpu_build.build(out_dir=tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp files left
    # the library's interface is its moepack_* functions; the files' shared helpers stay inside
    lib = ctypes.CDLL(str(first))
    assert lib.moepack_abi_version() == cpu_native.ABI_VERSION
    for name in ("mp_fast_tokens4", "mp_fast_tokens2"):
        assert not hasattr(lib, name), name


@needs_native
def test_a_kernel_with_wrong_results_is_not_used(monkeypatch):
    """The load-time self-check: a build that computes garbage (a compiler or CPU quirk) is
    refused with a warning, and the numba/torch path takes over."""
    real = cpu_native.NativeKernel.gemv
    monkeypatch.setattr(cpu_native.NativeKernel, "gemv", lambda self, *a: 1.001 * real(self, *a))
    cpu_native.native_kernel.cache_clear()
    try:
        with pytest.warns(UserWarning, match="wrong results"):
            assert cpu_native.native_kernel() is None
    finally:
        monkeypatch.undo()
        cpu_native.native_kernel.cache_clear()
    assert cpu_native.native_kernel() is not None


@needs_native
@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), words_per_group=st.sampled_from([1, 2, 3, 4, 8]),
       groups=st.integers(1, 20), rows=st.integers(1, 40), mg=st.integers(1, 300), tokens=st.integers(1, 6),
       seed=st.integers(0, 2**16), meta_bits=st.sampled_from([8, 4]))
def test_any_geometry_matches_the_rounded_reference(bits, words_per_group, groups, rows, mg, tokens, seed, meta_bits):
    """Random shapes, group sizes and meta group sizes: every path (in-register meta, per-row
    decode, scalar tails) against dequant(W) @ x^ with the kernel's own rounding of x."""
    cu = 8 if bits == 4 else 16
    spec = QuantSpec(bits, cu * words_per_group, meta_bits, mg)
    k = spec.group_size * groups
    data, w = packed((rows, k), spec, seed=seed)
    x = np.random.default_rng(seed).standard_normal((tokens, k)).astype(np.float32)
    y = run(data, (rows, k), spec, x, threads=2)
    xq = quantize_x(x, cu, x_steps(bits))
    ref = xq @ w.astype(np.float64).T
    # float32 sums: the error scales with the sum of |terms|, not with |result| (a row whose
    # terms cancel can end near zero); a wrong group, scale or lane is off by whole terms
    assert np.all(np.abs(y - ref) <= 1e-5 * (np.abs(xq) @ np.abs(w.astype(np.float64)).T) + 1e-9)


@needs_native
def test_tiny_and_zero_words_round_to_zero():
    """A word of subnormal activations (32767 / max would overflow) contributes nothing,
    like a word of zeros, and its neighbours are unaffected."""
    spec = QuantSpec(2, 16, 8, 128)
    data, w = packed((8, 64), spec, seed=3)
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    x[0, :16] = 1e-40  # one word of subnormals
    x[0, 16:32] = 0.0
    y = run(data, (8, 64), spec, x)
    xr = x.astype(np.float64).copy()
    xr[0, :32] = 0.0
    ref = quantize_x(xr.astype(np.float32), 16, x_steps(2)) @ w.astype(np.float64).T
    assert np.isfinite(y).all() and np.allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flags,wide", [
    (["-mavx2", "-mfma", "-mavx512f", "-mavx512vl", "-mavx512vnni"], False),
    (["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"], True),  # the 16-lane rows
    (["-mavx2", "-mfma", "-mavxvnni"], False)], ids=["avx512-vnni", "avx512-bw-vnni", "avx-vnni"])
def test_vnni_builds_use_vpdpwssd(tmp_path, flags, wide):
    """The VNNI dot products (the H100 host's Xeon has AVX-512) compile to vpdpwssd, on 512-bit
    registers where AVX-512 BW gives the 16-lane rows (vec.h). Compiled only: this CPU may lack
    them, and where they run the load-time self-check compares them with the format's reference
    decode before any result is used (the 16-lane rows' logic runs here too, emulated:
    test_cpu_wide.py). No -fopenmp: the rows are the same without it, and a compiler without
    OpenMP (clang without libomp) builds the kernel too."""
    import subprocess

    cc = cpu_build._compiler()
    if cc is None:
        pytest.skip("no C compiler")
    asm = tmp_path / "k.s"
    r = subprocess.run(cc.split() + ["-O3", "-std=c11", "-S", *flags, "-o", str(asm), str(cpu_build.SOURCE)],
                       capture_output=True, text=True)
    if r.returncode != 0 and "unrecognized" in r.stderr + r.stdout:
        pytest.skip(f"{cc} does not know {flags[-1]}")
    assert r.returncode == 0, r.stderr[-2000:]
    text = asm.read_text()
    version = subprocess.run(cc.split() + ["--version"], capture_output=True, text=True).stdout
    if "clang" in version:
        # LLVM (22, -march=sapphirerapids too) turns most vpdpwssd back into vpmaddwd + vpaddd by
        # its own tuning; the source asks for vpdpwssd all the same (gcc keeps every one)
        assert "vpdpwssd" in text
        return
    assert "vpdpwssd" in text and "vpmaddwd" not in text  # every int16 dot product of the kernel
    assert any("vpdpwssd" in line and "zmm" in line for line in text.splitlines()) == wide


def test_portable_build_without_vector_extensions(monkeypatch, tmp_path):
    """The C files built with neither -march=native nor OpenMP (a compiler that refuses both):
    the scalar paths pass the same self-check and compute fp16 matrices the same. An implicit
    declaration fails the build, as it does by default from gcc 14 on (gcc 12 only warns: the
    AVX2-only row functions were once called outside their #ifdef)."""
    if cpu_build._compiler() is None:
        pytest.skip("no C compiler")
    flags = ["-O2", "-std=c11", "-shared", "-fPIC", "-Werror=implicit-function-declaration"]
    monkeypatch.setattr(cpu_build, "_flag_sets", lambda: [flags])
    kernel = cpu_native.NativeKernel(cpu_build.build(out_dir=tmp_path))
    assert not kernel.avx2
    assert cpu_native.self_check(kernel) is None
    w = torch.randn(12, 37).half()
    x = torch.randn(2, 37)
    assert torch.allclose(kernel.gemv_f16(w, x, 1), x @ w.float().T, rtol=1e-5, atol=1e-5)


# the kernel's buffers for T tokens cannot be had: it must say so (a MemoryError in Python).
# Before its buffer structs were zeroed, a failed first allocation had it free the second
# one's uninitialised pointers: an abort ("munmap_chunk(): invalid pointer") or not, as the
# stack happened to hold, so this test could pass on that code too.
_OUT_OF_MEMORY = """
import resource, sys, torch
from formats.qtensor import QuantSpec
from runtime.cpu_native import expert_descriptor, native_kernel
from tests.runtime.kernel_cases import make_expert
layout, data, _ = make_expert(256, 1024, QuantSpec(2, 16, 8, 128), seed=7)
record, kernel, desc = torch.frombuffer(bytearray(data), dtype=torch.uint8), native_kernel(), expert_descriptor(layout)
T = 200_000  # x and the outputs exist; the kernel's own activation buffers (~1 GB) will not fit
x, h, y = torch.full((T, 256), 0.01), torch.empty(T, 1024), torch.empty(T, 256)
kernel._expert(record.data_ptr(), desc.data_ptr(), x[:1].data_ptr(), 1, h.data_ptr(), y.data_ptr(), 1)
used = int(open("/proc/self/statm").read().split()[0]) * 4096
resource.setrlimit(resource.RLIMIT_AS, (used + (64 << 20), resource.RLIM_INFINITY))
print(kernel._expert(record.data_ptr(), desc.data_ptr(), x.data_ptr(), T, h.data_ptr(), y.data_ptr(), 1))
"""


@needs_native
def test_out_of_memory_is_an_error_code_not_a_crash():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", _OUT_OF_MEMORY], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
    assert r.stdout.split()[-1] == "2"  # MP_NOMEM


@needs_native
def test_an_overflowing_hidden_state_gives_nan_not_finite_garbage():
    """x is checked finite on entry, but w2's input h = silu(w1 x) * w3 x is not: with x near
    float32's top, w1 x overflows. A word of h holding an inf or a NaN must make w2's sums NaN,
    as the float matmul's are; it used to be rounded to int32's minimum and summed (and with
    signed overflow, undefined behaviour in C)."""
    from runtime.cpu_native import expert_descriptor, native_kernel
    from tests.runtime.kernel_cases import make_expert

    layout, data, _ = make_expert(256, 1024, QuantSpec(2, 16, 8, 128), seed=7)
    record, kernel = torch.frombuffer(bytearray(data), dtype=torch.uint8), native_kernel()
    x = torch.full((1, 256), 3e38)
    x[0, ::2] = -3e38
    h, y = kernel.expert(record, expert_descriptor(layout), x, 1024, 256, 1)
    assert not torch.isfinite(h).all()  # the case this test is about
    assert torch.isnan(y).all()
