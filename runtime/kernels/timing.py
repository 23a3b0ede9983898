"""Measuring kernel calls: random packed matrices of any shape and spec, calls rotated over
copies of them, and timers (CUDA-graph replays between CUDA events on a GPU, the wall clock
for the Triton interpreter). Shared by `python -m runtime.tune` and tools/kernel_bench.py.

Weights are random bytes with sane scales: the time of a GEMV does not depend on the values,
but NaN/inf scales would make a correctness check meaningless. A measurement passes over
enough copies to exceed the GPU's L2 several times, so no call reads weights the previous
one left in L2 (a decode step streams every weight from HBM once).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from formats.qtensor import QuantSpec, matrix_layout

from ..dequant import component_tensors

# (fn, calls) -> microseconds per call of fn, where `calls` successive calls make one pass
# over every rotated copy
Timer = Callable[[Callable[[], object], int], float]

FALLBACK_L2_BYTES = 50 << 20  # H100; used when torch cannot report the L2 size
L2_PASSES = 4  # rotated copies add up to at least this many L2 sizes
MAX_COPIES = 64


def fill_random(buf: torch.Tensor, shape: tuple[int, int], spec: QuantSpec, base: int, gen: torch.Generator) -> None:
    """Random codes with scales ~0.01-0.05 and zeros inside the code range, written into
    the packed matrix at `base` of `buf` (uint8, already random bytes)."""
    comps = component_tensors(buf, shape, spec, base=base)
    if not spec.quantized:
        comps["weight"].copy_(torch.randn(shape, generator=gen, device="cpu").mul_(0.02))
        return
    top = float((1 << spec.bits) - 1)
    if spec.meta_bits == 16:
        comps["scale"].copy_(torch.empty(comps["scale"].shape).uniform_(0.01, 0.05, generator=gen))
        comps["zero"].copy_(torch.empty(comps["zero"].shape).uniform_(0.0, top, generator=gen))
    else:
        codes = float((1 << spec.meta_bits) - 1)
        comps["scale_meta"].copy_(torch.tensor([0.04 / codes, 0.01]).expand_as(comps["scale_meta"]))
        comps["zero_meta"].copy_(torch.tensor([top / codes, 0.0]).expand_as(comps["zero_meta"]))


def random_matrix(shape: tuple[int, int], spec: QuantSpec, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """The packed bytes (uint8, on `device`) of a random [rows, cols] matrix of `spec`."""
    nbytes = matrix_layout(shape, spec)[1]
    buf = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    fill_random(buf, shape, spec, 0, gen)
    return buf.to(device)


def rotating(fn: Callable[[int], object], n: int) -> Callable[[], object]:
    """fn(i) called with i = 0, 1, .., n-1, 0, ... on successive calls (`.calls` is n)."""
    state = {"i": 0}

    def call():
        i = state["i"]
        state["i"] = (i + 1) % n
        return fn(i)

    call.calls = n
    return call


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return FALLBACK_L2_BYTES
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or FALLBACK_L2_BYTES


def rotation_copies(nbytes: int, device: torch.device) -> int:
    """How many copies of `nbytes` of weights a measurement rotates over (at least 2)."""
    if device.type != "cuda":
        return 2  # the interpreter has no cache worth defeating; keep CPU runs short
    return min(MAX_COPIES, max(2, -(-L2_PASSES * l2_bytes(device) // max(nbytes, 1))))


def cuda_graph_timer(device: torch.device, rep_ms: float) -> Timer:
    """A Timer replaying one pass of calls captured in a CUDA graph, each replay between two
    CUDA events, for about `rep_ms`; the median replay over the calls per pass.

    Replays, not eager calls: the decode path replays graphs, and an eager call's time would
    be its Python and launch overhead (~100 us on a fast host) whenever that exceeds the
    kernel time, which is what is being tuned."""

    def measure(fn: Callable[[], object], calls: int) -> float:
        graph = capture_graph(fn, calls, device)
        graph.replay()  # first replay uploads the graph
        torch.cuda.synchronize(device)
        one = _events_ms(graph.replay, 3, device) / 3
        reps = int(min(1000, max(10, rep_ms / max(one, 1e-3))))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize(device)
        ms = statistics.median(start.elapsed_time(end) for start, end in events)
        return 1e3 * ms / calls

    return measure


def capture_graph(fn: Callable[[], object], calls: int, device: torch.device) -> "torch.cuda.CUDAGraph":
    """`calls` successive calls of fn (one pass over every rotated copy) captured in one CUDA
    graph, after 2 * calls warm-up calls on a side stream so that compiling and allocating
    happen outside the capture. Raises what capture raises (e.g. on a host sync)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2 * calls):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def _events_ms(fn: Callable[[], object], n: int, device: torch.device) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end)


def wall_clock_timer(repeats: int = 1) -> Timer:
    """A Timer for CPU tensors (the Triton interpreter): the median wall time of `repeats`
    passes after one warm-up call."""

    def measure(fn: Callable[[], object], calls: int) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t0) / calls)
        return 1e6 * statistics.median(times)

    return measure
