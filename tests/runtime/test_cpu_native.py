"""runtime.cpu_native: the compiled CPU kernel (runtime/csrc/qgemv_cpu.c) against the exact
dequantized matrix, on every path inside it (the in-register meta fast path, the per-row decode
path, the scalar tails), its refusals, and its build and fallback behaviour.

The kernel rounds x to integers per 32-bit word of codes (scale: the word's largest |x| / 32767,
or / 6553 for 2-bit codes, whose pairs are telescoped) and is otherwise exact, so it is checked
twice: against dequant(W) @ x^ with x^ that rounding done in numpy (tight: float32 summation
only), and against dequant(W) @ x (loose: 2^-16 or 2^-13.7 of each word's largest |x|)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from formats.qtensor import QuantSpec, component_views
from runtime import cpu_expert, cpu_native
from runtime.cpu_expert import cpu_expert_available, cpu_expert_ffn
from runtime.experts import plain_expert_ffn
from tests.runtime.kernel_cases import make_expert, packed

# one expert against its exact float64 value: x's rounding, up to 2^-13.7 of each word's largest
# |x| for 2-bit codes, through two matrices (fp16's own rounding is 2^-11)
EXPERT_TOL = 5e-4

needs_native = pytest.mark.skipif(cpu_native.native_kernel() is None, reason="no C compiler: the kernel is not built")


def x_steps(bits: int) -> int:
    """Integer steps per word's largest |x|: 2-bit pairs are telescoped (x_p - 4 x_(p-1) must fit
    int16), so they get 6553 (2^-13.7); 3- and 4-bit codes get all of int16."""
    return 6553 if bits == 2 else 32767


def quantize_x(x: np.ndarray, cu: int, steps: int = 32767) -> np.ndarray:
    """x rounded as the kernel rounds it: per word of cu codes, to integer steps of max|x| / steps."""
    t, k = x.shape
    xw = x.reshape(t, k // cu, cu).astype(np.float64)
    m = np.abs(xw).max(-1, keepdims=True).astype(np.float32)
    d = (m / np.float32(steps)).astype(np.float64)
    inv = np.where(m > 0, np.float32(steps) / np.where(m > 0, m, 1), 0).astype(np.float32)
    q = np.rint(x.reshape(t, k // cu, cu) * inv)
    return (q * d).reshape(t, k)


def run(data, shape, spec, x, threads=1):
    """The compiled kernel on a packed matrix's bytes, as runtime.cpu_expert calls it."""
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    y = cpu_native.native_kernel().gemv(buf, cpu_native.matrix_descriptor(shape, spec), torch.from_numpy(x), threads)
    return None if y is None else y.numpy()


def rel(a, b) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))


# (spec, N, K): the fast path (meta decoded in registers) at every words-per-group it has
# (1, 2, 4, 8, 16), and the per-row path: meta groups not a multiple of 8 (5, 12), rows of
# groups not a multiple of 8, words per group not a power of two (g96 at 2 bits), row tails of
# fewer than 8 words (K 48)
CASES = [
    (QuantSpec(2, 16, 8, 128), 40, 256),  # Mixtral's experts: fast, 1 word per group
    (QuantSpec(2, 32, 8, 64), 24, 512),
    (QuantSpec(2, 128, 8, 8), 16, 1024),  # 8 words per group
    (QuantSpec(2, 256, 8, 16), 8, 1024),  # 16 words per group: several vector steps per group
    (QuantSpec(3, 64, 8, 128), 40, 512),  # the 3-bit default: fast, 4 words per group
    (QuantSpec(3, 16, 8, 8), 16, 256),
    (QuantSpec(4, 64, 8, 256), 24, 512),  # the attention default at 4 bits
    (QuantSpec(4, 8, 8, 24), 16, 128),  # 4-bit g8: 1 word per group
    (QuantSpec(2, 16, 8, 5), 24, 256),  # meta groups straddle rows: per-row path
    (QuantSpec(3, 64, 8, 12), 16, 320),  # 5 groups per row
    (QuantSpec(2, 96, 8, 128), 16, 384),  # 6 words per group
    (QuantSpec(2, 16, 8, 128), 24, 48),  # 3 words per row: scalar only
    (QuantSpec(3, 16, 8, 7), 8, 208),  # 13 words per row: a vector step and a scalar tail
    # 4-bit meta codes (format version 2): nibbles expanded in registers, and per group
    (QuantSpec(2, 16, 4, 128), 40, 256),
    (QuantSpec(3, 64, 4, 128), 40, 512),
    (QuantSpec(4, 64, 4, 256), 24, 512),
    (QuantSpec(2, 16, 4, 5), 24, 256),  # per-row path, odd meta groups
    (QuantSpec(3, 16, 4, 7), 8, 208),  # 13 groups per row: rows start on odd groups
    (QuantSpec(2, 96, 4, 128), 16, 384),
]


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


def test_no_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(cpu_native, "_compiler", lambda: None)
    with pytest.raises(cpu_native.NativeBuildError, match="no C compiler"):
        cpu_native.build()


@needs_native
def test_build_is_cached_per_source_and_cpu(tmp_path):
    first = cpu_native.build(out_dir=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cpu_native.build(out_dir=tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp files left


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


def assert_tokens_batch_exactly(gemv, data, shape, spec, x):
    """gemv (data, shape, spec, x [T, K]) -> [T, N] on T tokens at once equals it token by token,
    bit for bit: a pass over several tokens shares each pair of codes' decode, nothing else
    (integer dots are exact, and each token's float sums take the same steps in order)."""
    together = gemv(data, shape, spec, x)
    alone = np.concatenate([gemv(data, shape, spec, x[t:t + 1]) for t in range(x.shape[0])])
    assert np.array_equal(together, alone)
    return together


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
    spec = QuantSpec(bits, cu * words_per_group, meta_bits, 8 * mg_blocks)
    k = spec.group_size * 8 * blocks
    data, w = packed((rows, k), spec, seed=seed)
    x = np.random.default_rng(seed).standard_normal((tokens, k)).astype(np.float32)
    y = assert_tokens_batch_exactly(lambda *a: run(*a, threads=2), data, (rows, k), spec, x)
    xq = quantize_x(x, cu, x_steps(bits))
    ref = xq @ w.astype(np.float64).T
    assert np.all(np.abs(y - ref) <= 1e-5 * (np.abs(xq) @ np.abs(w.astype(np.float64)).T) + 1e-9)


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

    cc = cpu_native._compiler()
    if cc is None:
        pytest.skip("no C compiler")
    asm = tmp_path / "k.s"
    r = subprocess.run(cc.split() + ["-O3", "-std=c11", "-S", *flags, "-o", str(asm), str(cpu_native.SOURCE)],
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
    if cpu_native._compiler() is None:
        pytest.skip("no C compiler")
    flags = ["-O2", "-std=c11", "-shared", "-fPIC", "-Werror=implicit-function-declaration"]
    monkeypatch.setattr(cpu_native, "_flag_sets", lambda: [flags])
    kernel = cpu_native.NativeKernel(cpu_native.build(out_dir=tmp_path))
    assert not kernel.avx2
    assert cpu_native.self_check(kernel) is None
    w = torch.randn(12, 37).half()
    x = torch.randn(2, 37)
    assert torch.allclose(kernel.gemv_f16(w, x, 1), x @ w.float().T, rtol=1e-5, atol=1e-5)


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
