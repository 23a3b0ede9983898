"""The GPU's side of a split expert (hybrid decode, runtime.offload.hybrid): a missed expert
whose work the CPU and the GPU share, computed from host RAM and from scratch copies, never
cached.

The CPU computes h = silu(w1 x) * w3 x for the rows of w1/w3 from `rows` on; the link copies
w2 and, when `rows` > 0, the first `rows` rows of w1 and w3 into this expert's scratch
buffers; the GPU computes those rows' h, joins the CPU's, and runs w2 h. Each matrix's
components are row-major, so a prefix of rows is a prefix of each component
(dequant.row_prefix_ok): a few contiguous copies per matrix into the layout of a [rows, H]
matrix. With rows = 0 this is the fixed cut (w1/w3 all on the CPU, w2 alone copied).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from formats.header import ExpertLayout

from ..dequant import _component_plan, component_bytes, component_tensors, dequantize, row_prefix_ok
from ..kernels import use_fused
from ..qlinear import QuantLinear
from .streams import NULL_EVENT, CopyEngine

# The largest share of w1/w3 rows the GPU may take: its scratch holds that much of both.
# Balanced splits on the H100 host's costs (t_copy ~1.2 ms, t_cpu ~1.0-1.5 ms) give it 0-0.3.
MAX_ROW_SHARE = 0.5
# Row counts come in multiples of this (at least): whole GEMV tiles.
ROW_STEP = 64
# ... and in sixteenths of w1's rows (rounded down to ROW_STEP): a few distinct GEMV shapes,
# each compiled and run once at start-up (warm_up), never inside a decode step.
ROW_LEVELS = 16
# "0": splits keep the fixed cut (w1/w3 on the CPU, w2 on the GPU), for A/B timing.
ROWS_ENV = "MOEPACK_SPLIT_ROWS"


def split_rows_enabled() -> bool:
    return os.environ.get(ROWS_ENV, "1") != "0"


def row_step(layout: ExpertLayout) -> int:
    """The smallest multiple of ROW_STEP at which w1 and w3 split into row prefixes, or 0."""
    m1 = layout.matrix("w1")
    n, k = m1.shape
    for r in range(ROW_STEP, n, ROW_STEP):
        if all(row_prefix_ok(r, k, layout.matrix(name).spec) for name in ("w1", "w3")):
            return r
    return 0


def max_rows(layout: ExpertLayout) -> int:
    """The most w1/w3 rows a split may give the GPU (0: none, the fixed cut)."""
    step = row_step(layout)
    if not step:
        return 0
    return int(MAX_ROW_SHARE * layout.matrix("w1").shape[0]) // step * step


def _prefix_spans(layout: ExpertLayout, rows: int) -> dict[str, int]:
    """Bytes of w1's and w3's scratch for `rows` rows each (none for 0 rows)."""
    if not rows:
        return {}
    return {m: _component_plan((rows, layout.matrix(m).shape[1]), layout.matrix(m).spec)[1] for m in ("w1", "w3")}


def scratch_bytes(layout: ExpertLayout, rows: bool) -> int:
    """Device bytes of one split expert's scratch: w2, and with `rows` the row prefixes."""
    return layout.matrix("w2").nbytes + sum(_prefix_spans(layout, max_rows(layout) if rows else 0).values())


class SplitScratch:
    """Scratch sets for split experts: w2's record bytes and buffers for w1's and w3's row
    prefixes. One set per expert a token can split (top_k), plus one when the next layer's
    likely miss has its w2 staged ahead (`sets`, offload.engine)."""

    def __init__(self, layout: ExpertLayout, sets: int, device: torch.device, dtype: torch.dtype, rows: bool,
                 graphs: bool = False):
        self.layout, self.dtype = layout, dtype
        m2 = layout.matrix("w2")
        self._w2_span = (m2.offset, m2.offset + m2.nbytes)  # w2's bytes in a record
        self.max_rows = max_rows(layout) if rows else 0
        self.step = row_step(layout) if self.max_rows else 0
        self.w2 = [QuantLinear(torch.zeros(m2.nbytes, dtype=torch.uint8, device=device), m2.shape, m2.spec, dtype)
                   for _ in range(sets)]
        self.prefix = [{m: torch.zeros(n, dtype=torch.uint8, device=device)
                        for m, n in _prefix_spans(layout, self.max_rows).items()} for _ in range(sets)]
        self.free = [NULL_EVENT] * sets  # compute that last read each set done
        # CUDA graphs of the GPU's two GEMVs per set (and row count): an eager Triton launch cost
        # ~110 us of host time on the H100 host, and a split's launches delay the CPU's start
        # (the GPU rows are queued first) and the layer's end (w2 h after the CPU's rows)
        self._hidden_graphs: dict[tuple[int, int], tuple] = {}  # (set, rows) -> (graph, h [1, rows])
        self._w2_graphs: list[tuple | None] = [None] * sets  # set -> (graph, y [1, H])
        # the first call of a GEMV shape compiles its kernel (seconds): not inside a decode step
        self.w2[0](torch.zeros(1, m2.shape[1], dtype=dtype, device=device))
        self.warm_up(torch.zeros(1, layout.matrix("w1").shape[1], dtype=dtype, device=device))
        if graphs:
            self._capture(device)

    def rows_for(self, share: float) -> int:
        """Rows of w1/w3 for the GPU at `share` of them (CostModel.gpu_rows), rounded down to a
        level (ROW_LEVELS) and to whole steps."""
        if not self.step:
            return 0
        n = self.layout.matrix("w1").shape[0]
        level = int(min(share, 1.0) * ROW_LEVELS) * n // ROW_LEVELS
        return min(self.max_rows, level // self.step * self.step)

    def row_counts(self) -> list[int]:
        """Every row count rows_for can return but 0."""
        return sorted({self.rows_for(i / ROW_LEVELS) for i in range(ROW_LEVELS + 1)} - {0})

    def warm_up(self, x: torch.Tensor) -> None:
        """Run the GPU rows' GEMV once at every row count (on zeros): the first call of a launch
        config compiles it (seconds), which must land neither in a decode step nor in the
        CPU's measured time. Off CUDA nothing compiles: nothing to do."""
        if x.device.type != "cuda":
            return
        for rows in self.row_counts():
            self.gpu_hidden(None, 0, rows, x, None)

    def copy(self, copier: CopyEngine, record: torch.Tensor, i: int, rows: int, w2_done=None):
        """Copy the host `record`'s w2 into set i, and the first `rows` rows of w1 and w3:
        (w2's event, the prefixes' event or None). w2_done: set i holds this record's w2
        already (stage_w2's event), so only the rows are copied."""
        prefix_done = None
        for m in ("w1", "w3") if rows else ():
            mat = self.layout.matrix(m)
            src_off = {c[0]: c[3] for c in _component_plan(tuple(mat.shape), mat.spec)[0]}
            part, _ = _component_plan((rows, mat.shape[1]), mat.spec)
            size = component_bytes((rows, mat.shape[1]), mat.spec)
            for name, _, _, dst, _, _ in part:  # each component's first rows: its first bytes
                src = mat.offset + src_off[name]
                prefix_done = copier.copy(self.prefix[i][m][dst:dst + size[name]], record[src:src + size[name]],
                                          after=self.free[i])
        if w2_done is None:
            w2_done = self.stage_w2(copier, record, i)
        return w2_done, prefix_done

    def stage_w2(self, copier: CopyEngine, record: torch.Tensor, i: int):
        """Copy the host `record`'s w2 into set i once the set's last reader is done: its event."""
        a, b = self._w2_span
        return copier.copy(self.w2[i].raw, record[a:b], after=self.free[i])

    def _capture(self, device: torch.device) -> None:
        """Capture every set's graphs: h at each row count (rows_for's), and w2 h. They read
        static inputs (self.x, self.h_in) and the sets' scratch bytes, so refilled scratch
        needs no re-capture. Only where the fused GEMVs run (the eager fallback would
        dequantize into the graphs' pool)."""
        from ..graphs import capture
        from ..kernels.qgemv import gemv_supported

        m1, m2 = self.layout.matrix("w1"), self.layout.matrix("w2")
        self.x = torch.zeros(1, m1.shape[1], dtype=self.dtype, device=device)  # the hidden graphs' input
        self.h_in = [torch.zeros(1, m2.shape[1], dtype=self.dtype, device=device) for _ in self.w2]  # w2's inputs
        if not use_fused(self.x):
            return
        hidden = [r for r in self.row_counts()
                  if all(gemv_supported((r, m1.shape[1]), self.layout.matrix(m).spec) for m in ("w1", "w3"))]
        for i in range(len(self.w2)):
            # a pool per set: a step replays every split's h graph before it reads any h, and in
            # a shared pool one set's later graphs (w2's temporaries) may sit on another's h
            # (replays out of capture order); within a set, h is read before its w2 replays
            pool = torch.cuda.graph_pool_handle()
            for rows in hidden:
                self._hidden_graphs[(i, rows)] = capture(lambda i=i, rows=rows: self._hidden(i, rows, self.x), device, pool)
            if gemv_supported(tuple(m2.shape), m2.spec):
                self._w2_graphs[i] = capture(lambda i=i: self.w2[i](self.h_in[i]), device, pool)

    def gpu_hidden(self, copier: CopyEngine | None, i: int, rows: int, x: torch.Tensor, prefix_done) -> torch.Tensor:
        """h of w1/w3's first `rows` rows for x [1, H] on the device, once set i's prefixes
        landed: [1, rows] in the compute dtype. Queued on the compute stream; no host wait.
        A captured graph's h is overwritten by the next replay of a graph of set i (its w2,
        or the next layer's split): read it before."""
        if copier is not None:
            copier.wait(prefix_done)
        g = self._hidden_graphs.get((i, rows))
        if g is not None:
            self.x.copy_(x)
            g[0].replay()
            return g[1]
        return self._hidden(i, rows, x)

    def _hidden(self, i: int, rows: int, x: torch.Tensor) -> torch.Tensor:
        m1 = self.layout.matrix("w1")
        shape = (rows, m1.shape[1])
        c1, c3 = (component_tensors(self.prefix[i][m], shape, self.layout.matrix(m).spec) for m in ("w1", "w3"))
        x = x.to(self.dtype)
        if use_fused(x):
            from ..kernels.qgemv import gemv

            h = gemv(x, [c1, c3], shape, m1.spec)  # one gated launch
            if h is not None:
                return h
        w1, w3 = (dequantize(c, shape, self.layout.matrix(m).spec, self.dtype) for c, m in ((c1, "w1"), (c3, "w3")))
        return F.silu(F.linear(x, w1)) * F.linear(x, w3)

    def w2_apply(self, copier: CopyEngine, i: int, h: torch.Tensor, w2_done) -> torch.Tensor:
        """w2 h for h [1, I] on the device, once set i's w2 landed; set i is free again after."""
        copier.wait(w2_done)
        g = self._w2_graphs[i]
        if g is not None:
            self.h_in[i].copy_(h)
            g[0].replay()
            y = g[1]  # overwritten by this set's next replay: the caller's product with w is new
        else:
            y = self.w2[i](h)
        self.free[i] = copier.mark_used()
        return y
