"""runtime.cpu_expert (the CPU path for one packed expert) against the plain torch path
runtime.experts.plain_expert_ffn (not expert_ffn: on the CPU it dispatches to cpu_expert itself
for a few tokens), with each of its kernels, and its fallback when neither is there. The numba
kernel reorders float32 sums (factored form, fastmath): a relative 1e-5. The compiled kernel
(runtime.cpu_native, tested on its own in test_cpu_native.py) also rounds x to integers per word
of codes (2^-13.7 of the word's largest |x| for 2-bit codes, finer than fp16's 2^-11): a
relative 5e-4, fp16's own rounding."""

from __future__ import annotations

import pytest
import torch

from formats.qtensor import QuantSpec
from runtime import cpu_expert, cpu_native
from runtime.cpu_expert import cpu_expert_available, cpu_expert_ffn
from runtime.experts import plain_expert_ffn
from tests.runtime.kernel_cases import make_expert

KERNELS = {"numba": 1e-5, "native": 5e-4}  # kernel -> relative tolerance against the plain path


@pytest.fixture(params=list(KERNELS))
def kernel(request, monkeypatch):
    """Run the test with one CPU kernel: the other one is switched off (where the compiled kernel
    declines a layout, numba runs it)."""
    if request.param == "numba":
        if cpu_expert._numba() is None:
            pytest.skip("numba is not installed (the `cpu` extra)")
        monkeypatch.setattr(cpu_expert, "_native", lambda: None)
    elif cpu_native.native_kernel() is None:
        pytest.skip("no C compiler: the compiled kernel is not built")
    return request.param


def record_of(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


# (spec, hidden, intermediate): every width, g16/g64/g128, both meta kinds, meta groups that
# straddle rows (5, 24) or cover many; odd-but-valid shapes (K a multiple of the group size only)
CASES = [
    (QuantSpec(2, 16, 8, 128), 48, 80),
    (QuantSpec(2, 64, 16), 64, 192),
    (QuantSpec(3, 64, 8, 128), 64, 192),
    (QuantSpec(3, 16, 8, 5), 48, 112),
    (QuantSpec(4, 128, 8, 24), 128, 256),
    (QuantSpec(4, 16, 16), 32, 48),
    (QuantSpec(8, 64, 8, 256), 64, 128),
    (QuantSpec(8, 128, 16), 128, 384),
    (QuantSpec(2, 24, 8, 7), 48, 72),  # a group size that is not a power of two
    (QuantSpec(2, 16, 4, 128), 48, 80),  # 4-bit meta codes (format version 2)
    (QuantSpec(3, 16, 4, 5), 48, 112),
]


@pytest.mark.parametrize("spec,hidden,inter", CASES, ids=lambda v: v.describe() if isinstance(v, QuantSpec) else str(v))
@pytest.mark.parametrize("tokens", [1, 3])
def test_matches_plain_path(spec, hidden, inter, tokens, kernel):
    layout, data, _ = make_expert(hidden, inter, spec, seed=spec.bits + spec.group_size + hidden)
    record = record_of(data)
    x = 0.1 * torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens))
    y = cpu_expert_ffn(record, layout, x)
    assert y.shape == (tokens, hidden) and y.dtype == torch.float32
    assert rel_err(y, plain_expert_ffn(record, layout, x, torch.float32)) < KERNELS[kernel]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_activations_and_threads(dtype, kernel):
    layout, data, _ = make_expert(64, 128, QuantSpec(2, 16, 8, 128), seed=3)
    record = record_of(data)
    x = (0.1 * torch.randn(2, 64, generator=torch.Generator().manual_seed(0))).to(dtype)
    ref = plain_expert_ffn(record, layout, x.float(), torch.float32)
    for threads in (1, 2):
        y = cpu_expert_ffn(record, layout, x, threads=threads)
        assert y.dtype == dtype and rel_err(y.float(), ref) < 1e-2


def test_fallback_without_kernels(monkeypatch):
    """Neither numba nor a compiled kernel: the plain torch path, and cpu_expert_available() says so."""
    monkeypatch.setattr(cpu_expert, "_numba", lambda: None)
    monkeypatch.setattr(cpu_expert, "_native", lambda: None)
    assert not cpu_expert.cpu_expert_available()
    monkeypatch.setattr(cpu_expert, "_kernel", lambda bits, group: pytest.fail("the numba kernel was used"))
    layout, data, _ = make_expert(48, 80, QuantSpec(3, 16, 16), seed=1)
    record = record_of(data)
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(1))
    y = cpu_expert_ffn(record, layout, x)
    assert torch.equal(y, plain_expert_ffn(record, layout, x, torch.float32))


def test_import_does_not_load_numba():
    import subprocess
    import sys

    code = ("import sys, runtime.cpu_expert, runtime.experts; "
            "assert 'numba' not in sys.modules and 'runtime.cpu_native' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
