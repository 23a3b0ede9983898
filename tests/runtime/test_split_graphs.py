"""A split expert's GPU GEMVs replayed from captured graphs (SplitScratch(graphs=True)) give
what the eager calls give: the graphs' static inputs are filled per call, and each set and
row count has its own graph. Without CUDA the kernels run under the Triton interpreter and a
"graph" re-runs what was captured into the captured output (the real capture is checked by
tests/runtime/test_offload_cuda.py::test_cuda_hybrid_same_as_resident on a GPU)."""

from __future__ import annotations

import pytest
import torch

import runtime.graphs as graphs_mod
from formats.reader import MoepackFile
from runtime.offload import split
from runtime.offload.streams import CopyEngine

from .interpreter import CUDA, interpreted_kernels, use_interpreter
from .test_offload_helpers import tiny_file

interpreted_kernels()
# on a GPU these run compiled: `pytest -m cuda` (tools/gpu_all.sh) must select them
pytestmark = [pytest.mark.cuda] if CUDA else []


class _Replay:
    """Stands in for a CUDA graph: replay() runs the captured function into the captured output."""

    def __init__(self, fn, out):
        self.fn, self.out, self.replays = fn, out, 0

    def replay(self):
        self.replays += 1
        self.out.copy_(self.fn())


@pytest.fixture
def scratch_pair(tmp_path, monkeypatch):
    use_interpreter(monkeypatch)
    if not CUDA:
        monkeypatch.setattr(graphs_mod, "capture", lambda fn, device, pool: (lambda out: (_Replay(fn, out), out))(fn()))
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    file = MoepackFile(tiny_file(tmp_path, layers=2, experts=4))
    device = torch.device("cuda" if CUDA else "cpu")
    layout = file.header.expert_layout
    make = lambda g: split.SplitScratch(layout, 3, device, torch.float32, rows=True, graphs=g)  # noqa: E731
    return file, device, make(True), make(False)


def test_split_graphs_match_the_eager_calls(scratch_pair):
    file, device, graphed, eager = scratch_pair
    assert graphed.row_counts() and len(graphed._hidden_graphs) == 3 * len(graphed.row_counts())
    assert all(g is not None for g in graphed._w2_graphs) and not eager._hidden_graphs
    copier = CopyEngine(device)
    gen = torch.Generator().manual_seed(0)
    H, I = file.config.hidden_size, file.config.intermediate_size
    for step, (i, e) in enumerate([(0, 1), (2, 3), (1, 0), (0, 2)]):  # sets reused with other experts
        record = torch.from_numpy(file.expert_bytes(step % 2, e).copy())
        x = torch.randn(1, H, generator=gen).to(device)
        h = torch.randn(1, I, generator=gen).to(device)
        for rows in graphed.row_counts():
            outs = []
            for s in (graphed, eager):
                w2_done, rows_done = s.copy(copier, record, i, rows)
                outs.append((s.gpu_hidden(copier, i, rows, x, rows_done).clone(), s.w2_apply(copier, i, h, w2_done).clone()))
            (hg, yg), (he, ye) = outs
            assert hg.shape == (1, rows) and torch.equal(hg, he), (i, e, rows)
            assert torch.equal(yg, ye), (i, e, rows)
    if not CUDA:  # the graphs, not the eager path, produced those
        assert sum(g[0].replays for g in graphed._hidden_graphs.values()) == 4 * len(graphed.row_counts())
        assert sum(g[0].replays for g in graphed._w2_graphs) == 4 * len(graphed.row_counts())


def test_each_set_captures_into_a_pool_of_its_own(tmp_path, monkeypatch):
    """A step replays every split's h graph before it reads any h: sets must not share a
    pool, where a later capture's temporaries may lie on an earlier graph's output (replays
    out of capture order). Within a set, h is read before its w2 graph replays."""
    if CUDA:
        pytest.skip("counts pools through stand-ins for torch's capture")
    use_interpreter(monkeypatch)
    pools, seen = iter(range(100)), {}

    def capture(fn, device, pool):
        out = fn()
        seen[id(out)] = pool
        return _Replay(fn, out), out

    monkeypatch.setattr(graphs_mod, "capture", capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: next(pools))
    file = MoepackFile(tiny_file(tmp_path, layers=2, experts=4))
    s = split.SplitScratch(file.header.expert_layout, 3, torch.device("cpu"), torch.float32, rows=True, graphs=True)
    per_set = []
    for i in range(3):
        mine = {seen[id(g[1])] for (j, _), g in s._hidden_graphs.items() if j == i} | {seen[id(s._w2_graphs[i][1])]}
        assert len(mine) == 1
        per_set += mine
    assert len(set(per_set)) == 3
