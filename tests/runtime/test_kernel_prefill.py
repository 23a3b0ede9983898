"""The prefill path's kernels: the dequantize kernels (byte- and word-wise) bit for bit against
the format's decoder, and the fused dequantize-GEMM against dequantize-then-matmul."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from formats.errors import ConfigError
from formats.qtensor import QuantSpec
from runtime.dequant import component_tensors

from .kernel_cases import (  # noqa: F401 (_interpreter: a fixture)
    ACT, CASES, DEVICES, _interpreter, on_device, packed, reference_matmul, rel_err,
)

# after kernel_cases, which sets up the interpreter before runtime.kernels loads the kernels
from runtime.kernels import dequantize_into, prefill  # noqa: E402


# ------------------------------------------------------------------ dequantize kernel

DEQUANT_CASES = [pytest.param(p.values[0], (p.values[1][0], p.values[1][1]), id=p.id.rsplit("-T", 1)[0]) for p in CASES]
DEQUANT_CASES += [
    pytest.param(QuantSpec(2, 8, 8, 16), (3, 24), id="K24"),
    pytest.param(QuantSpec(3, 8, 16), (5, 40), id="K40-3bit"),
    pytest.param(QuantSpec(3, 24, 8, 7), (7, 96), id="g24"),
    pytest.param(QuantSpec(4, 16, 16), (4, 48), id="K48"),
    pytest.param(QuantSpec(8, 40, 8, 3), (6, 120), id="g40-8bit"),
    # the word-wise kernel's grid covering the matrix exactly (EVEN: unmasked loads and stores)
    pytest.param(QuantSpec(2, 16, 8, 128), (16, 512), id="even-2bit"),
    pytest.param(QuantSpec(3, 64, 8, 128), (32, 512), id="even-3bit"),
    pytest.param(QuantSpec(4, 64, 16), (16, 256), id="even-4bit"),
    pytest.param(QuantSpec(3, 64, 4, 128), (32, 512), id="even-3bit-m4"),
    pytest.param(QuantSpec(2, 8, 4, 16), (3, 24), id="K24-m4"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec,shape", DEQUANT_CASES)
def test_dequantize_kernel_is_exact(device, spec, shape):
    data, w = packed(shape, spec, 5)
    comps = component_tensors(on_device(data, device), shape, spec)
    out = torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    dequantize_into(comps, shape, spec, out)
    assert np.array_equal(out.cpu().numpy(), w)  # same float32 operations as the reference, no FMA
    half = torch.full(shape, float("nan"), dtype=torch.float16, device=device)
    dequantize_into(comps, shape, spec, half)
    assert torch.allclose(half.cpu().float(), torch.from_numpy(w).half().float(), rtol=1e-3, atol=1e-3)


# the fused dequantize-GEMM (prefill): every width, meta kind, a per-code group case, and
# shapes whose M, N and K tails the tiles do not cover
GEMM_CASES = [
    (QuantSpec(2, 16, 8, 128), (70, 256), 37),
    (QuantSpec(2, 8, 8, 16), (33, 128), 65),  # groups of 8: two per word, scales per code
    (QuantSpec(3, 64, 8, 128), (64, 192), 20),
    (QuantSpec(3, 32, 16), (40, 96), 17),
    (QuantSpec(4, 64, 8, 256), (96, 320), 64),
    (QuantSpec(4, 16, 16), (20, 64), 3),
    (QuantSpec(8, 32, 8, 24), (24, 160), 18),
    (QuantSpec(2, 16, 4, 128), (70, 256), 37),  # 4-bit meta codes
    (QuantSpec(2, 8, 4, 3), (33, 128), 65),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec,shape,tokens", GEMM_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_fused_gemm_matches_dequantize_and_matmul(device, spec, shape, tokens, monkeypatch):
    """qgemm_kernel decodes the same weights as the dense path (rounded to x's dtype) and
    multiplies them; MOEPACK_PREFILL=fused sends prefill_matmul there."""
    dtype, tol = ACT[device]
    data, w = packed(shape, spec, 7)
    comps = component_tensors(on_device(data, device), shape, spec)
    x = (0.1 * torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(4))).to(device, dtype)
    ref = reference_matmul(x, torch.from_numpy(w).to(dtype).float().numpy())  # W as the dense path rounds it
    y = prefill.fused_gemm(x, comps, shape, spec, config=(16, 16, 64, 4, 1))
    assert y.shape == (tokens, shape[0]) and y.dtype == dtype
    assert rel_err(y, ref) < (tol if device == "cpu" else 2e-3)
    monkeypatch.setenv(prefill.PREFILL_ENV, "fused")
    calls = []
    monkeypatch.setattr(prefill, "fused_gemm", lambda *a, **k: calls.append(1) or y)
    assert prefill.prefill_matmul(x, comps, shape, spec) is y and calls


def test_prefill_mode_is_validated(monkeypatch):
    monkeypatch.setenv(prefill.PREFILL_ENV, "fast")
    with pytest.raises(ConfigError, match="MOEPACK_PREFILL='fast'"):
        prefill.prefill_mode()
    monkeypatch.setenv(prefill.PREFILL_ENV, "")
    assert prefill.prefill_mode() == "dequant"


def test_dequantize_cases_cover_both_kernels():
    """The word-wise kernel takes the usual layouts, the byte-wise one the rest: the cases
    above run both (a change to the dispatch that sent everything one way would go unseen)."""
    words = [prefill._words(*(lambda c: (c["q"], c.get("q_hi", c["q"])))(
        component_tensors(on_device(packed(p.values[1], p.values[0], 0)[0], "cpu"), p.values[1], p.values[0])),
        p.values[1], p.values[0]) is not None for p in DEQUANT_CASES]
    assert any(words) and not all(words)


def test_dequantize_words_need_aligned_planes():
    """A plane that does not start on a 4-byte boundary cannot be read as words, nor one whose
    rows are not back to back (the kernel addresses row r at r * its width); the caller then
    takes the byte-wise kernel."""
    spec, shape = QuantSpec(2, 16, 8, 128), (8, 64)
    buf = torch.zeros(8 * 20 + 4, dtype=torch.uint8)

    def plane(start, width):  # rows of `width` bytes, back to back from byte `start`
        return buf[start : start + 8 * width].view(8, width)

    assert prefill._words(plane(0, 16), plane(0, 16), shape, spec) is not None
    assert prefill._words(plane(1, 16), plane(0, 16), shape, spec) is None
    assert prefill._words(plane(0, 20)[:, :16], plane(0, 16), shape, spec) is None  # rows 20 bytes apart
    spec3 = QuantSpec(3, 16, 8, 128)  # its high plane is read as 16-bit half-words
    assert prefill._words(plane(0, 16), plane(2, 8), shape, spec3) is not None
    assert prefill._words(plane(0, 16), plane(1, 8), shape, spec3) is None


@pytest.mark.cuda
def test_scratch_taken_in_a_graph_capture_is_the_graphs_own():
    """The cached buffer is freed when it grows: a graph that baked in its address would write
    into memory handed to someone else on every replay. Inside a capture the buffer is an
    allocation of the graph's own pool, and the cache outside stays as it was."""
    dev = torch.device("cuda")
    prefill.release_scratch()
    cached = prefill.scratch(dev, torch.float16, 1 << 12)
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        inside = prefill.scratch(dev, torch.float16, 1 << 12)
        inside.fill_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    assert inside.data_ptr() != cached.data_ptr() and bool((inside == 1.0).all())
    assert prefill.scratch(dev, torch.float16, 1 << 12).data_ptr() == cached.data_ptr()
    prefill.release_scratch()
