"""CUDA graphs of one expert's FFN per record row, for decode (one token).

Why: on the H100 host an eager `fused_expert_ffn` call costs ~630 us of host time (Python,
views, two Triton launches) for ~125 us of GPU work, so a decode step was bound by the host.
A captured graph replays the same kernels for ~10-20 us of host time. Every record of a file
shares one layout (FORMAT.md), so a graph per row of a [rows, record_size] buffer (all
resident experts, or the offloading engine's slots) covers every expert: the kernels read
whatever bytes the row holds when the graph replays, so slots refilled by the copy engine
need no re-capture.

Graphs share one memory pool: their intermediates are reused from graph to graph, which is
safe because replays run in stream order; each graph's output stays allocated (and is
overwritten by that graph's next replay, so callers consume it before replaying it again).
"""

from __future__ import annotations

import torch

from formats.header import ExpertLayout

from .kernels import fused_expert_ffn


def capture(fn, device: torch.device, pool) -> tuple[torch.cuda.CUDAGraph, object]:
    """(graph, fn's output) of fn() captured in `pool`, after one eager run on a side stream
    (as torch's graph docs require: it compiles the kernels and settles the allocator). The
    output is overwritten by every replay."""
    cur = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(cur)
    with torch.cuda.stream(side):
        fn()
    cur.wait_stream(side)
    g = torch.cuda.CUDAGraph()
    # thread_local: the offloading host tier's reader threads may use CUDA meanwhile
    with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
        out = fn()
    return g, out


def graphs_supported(device: torch.device) -> bool:
    """Whether expert graphs can run here: a CUDA device and the Triton kernels."""
    from .kernels import triton_available

    return torch.device(device).type == "cuda" and torch.cuda.is_available() and triton_available()


def expert_graphs(records: torch.Tensor, layout: ExpertLayout, dtype: torch.dtype, hidden: int,
                  enabled: bool | None) -> "ExpertGraphs | None":
    """The backends' decode graphs over `records`, every row captured now; None when disabled.
    enabled=None: on wherever graphs can run (graphs_supported)."""
    if enabled is None:
        enabled = graphs_supported(records.device)
    if not enabled:
        return None
    graphs = ExpertGraphs(records, layout, dtype, hidden)
    graphs.capture_all()
    return graphs


class ExpertGraphs:
    """set_input(x [1, H]) once per layer, then run(row) -> [1, H] (in `dtype`) per expert:
    the FFN of records[row] applied to x, by graph replay."""

    def __init__(self, records: torch.Tensor, layout: ExpertLayout, dtype: torch.dtype, hidden: int):
        # records: [rows, record_size] uint8
        self.records, self.layout, self.dtype = records, layout, dtype
        self.device = records.device
        # off CUDA (the CPU tests) the same interface runs each call eagerly
        self.capturing = self.device.type == "cuda"
        self.x = torch.zeros(1, hidden, dtype=dtype, device=self.device)  # the graphs' static input
        self.graphs: list[torch.cuda.CUDAGraph | None] = [None] * records.shape[0]
        self.out: list[torch.Tensor | None] = [None] * records.shape[0]
        self.pool = torch.cuda.graph_pool_handle() if self.capturing else None
        self._warm = False
        self.replays = 0

    def _warm_up(self) -> None:
        # compile the kernels and settle the allocator outside any capture (side stream, as
        # torch's graph docs require), once: every row has the same layout and alignment
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fused_expert_ffn(self.records[0], self.layout, self.x)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._warm = True

    def capture(self, row: int) -> None:
        if not self.capturing:
            return
        if not self._warm:
            self._warm_up()
        g = torch.cuda.CUDAGraph()
        # thread_local: the host tier's reader threads may touch CUDA (pinned buffers) meanwhile
        with torch.cuda.graph(g, pool=self.pool, capture_error_mode="thread_local"):
            y = fused_expert_ffn(self.records[row], self.layout, self.x)  # [1, H]
        self.graphs[row], self.out[row] = g, y

    def capture_all(self) -> None:
        """Capture every row now (a few ms each), so no capture lands inside a timed decode."""
        for row in range(len(self.graphs)):
            if self.graphs[row] is None:
                self.capture(row)

    def set_input(self, x: torch.Tensor) -> None:
        # x: [1, H]; every expert of a layer reads the same token: one copy per layer
        self.x.copy_(x)

    def run(self, row: int) -> torch.Tensor:
        """records[row]'s FFN of the last set_input; valid until this row's next run."""
        self.replays += 1
        if not self.capturing:
            from .experts import expert_ffn  # runtime.experts imports this module

            return expert_ffn(self.records[row], self.layout, self.x, self.dtype)
        g = self.graphs[row]
        if g is None:
            self.capture(row)
            g = self.graphs[row]
        g.replay()
        return self.out[row]
