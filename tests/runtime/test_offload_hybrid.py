"""OffloadedExperts with --hybrid on the CPU "device": misses computed on the CPU from their host
records, split experts (w1/w3 rows on the CPU and the GPU, w2 copied alone), w2 staged for the
next layer (--prefetch-w2), and the cost model's choice between copying and computing (the
link's queue, a free slot, the memory plan's scratch). Greedy tokens equal and logits close to
the resident model's; the setup is offload_cases.py's."""

from __future__ import annotations

import pytest
import torch

from formats.errors import ConfigError
from formats.reader import MoepackFile
from runtime.offload.cache import UNKNOWN_REUSE
from runtime.offload.options import OffloadOptions, preflight
from runtime.offload.streams import CopyEngine

from runtime.loader import load_model

from .offload_cases import (CTX, EXPERTS, HALF_TOL, HYBRID_MODES, LAYERS, assert_hybrid_mode_ran, assert_same,  # noqa: F401
                            force_hybrid_mode, greedy, hybrid_kw, offloaded, tiny)  # (tiny: a fixture)


@pytest.mark.parametrize("kw", [
    dict(n_slots=LAYERS),  # one slot per layer: what is not computed on the CPU runs in waves
    dict(n_slots=2 * LAYERS),
    dict(n_slots=3 * LAYERS, prefetch=2),
    dict(n_slots=3 * LAYERS, policy="lfu", cuda_graphs=True),
], ids=["layer1", "layer2", "layer3-pf", "lfu3-graph-interface"])
def test_hybrid_same_tokens(tiny, kw):
    """Missed experts computed on the CPU from their host records (offload.hybrid) instead of
    copied: the same tokens and logits as the resident model."""
    path, ref = tiny
    model = offloaded(path, hybrid=True, cpu_threads=1, **kw)
    model.experts.cost.cpu_s = 0.0  # the CPU looks free: every eligible miss goes there
    assert_same(ref, greedy(model))
    s = model.experts.stats()
    assert s["hybrid"] and s["cpu_experts"] > 0 and s["cpu_expert_s"] > 0
    assert s["uses"] == s["hits"] + s["misses"]
    # which kernel was calibrated, on how many timed calls, and every CPU expert time seen since
    calib = s["cpu_calibration"]
    assert calib["kernel"] in ("native", "numba", "torch") and len(calib["samples_ms"]) == 5
    obs = s["cpu_observed_ms"]
    assert obs["n"] >= 1 and 0 < obs["min"] <= obs["median"] <= obs["max"]


@pytest.mark.parametrize("kw", [dict(n_slots=2 * LAYERS), dict(n_slots=3 * LAYERS, policy="lfu", cuda_graphs=True)],
                         ids=["layer2", "lfu3-graph-interface"])
def test_hybrid_split_experts_same_tokens(tiny, kw):
    """A CPU as fast as the link: single misses are split (w1/w3 on the CPU, w2 copied alone
    and applied on the device); the same tokens and logits as the resident model."""
    path, ref = tiny
    model = offloaded(path, hybrid=True, cpu_threads=1, **kw)
    cost = model.experts.cost
    cost.smoothing, cost.cpu_s = 0.0, cost.copy_s
    assert cost.assign(1) == (0, 1, 0)
    copies_before = model.experts.copier.copies
    assert_same(ref, greedy(model))
    s = model.experts.stats()
    assert s["split_experts"] > 0 and s["split_cpu_s"] > 0
    assert s["uses"] == s["hits"] + s["misses"]
    assert model.experts.copier.copies > copies_before  # the w2 copies went through the copy engine
    assert s["split_gpu_row_share"] == 0  # a CPU as fast as the link: w1/w3 all on the CPU
    m2 = model.experts.layout.matrix("w2")
    # top_k scratch sets, allocated (and their GEMV run once) at start-up, not in a decode step
    split = model.experts.split
    assert all(b.raw.numel() == m2.nbytes for b in split.w2) and len(split.w2) == len(split.prefix) == 2


def test_hybrid_row_split_same_tokens(tiny, monkeypatch):
    """A CPU at half the link's speed: the GPU takes half of each split expert's w1/w3 rows
    (copied with w2, offload.split) and the CPU the other half; the same tokens and logits."""
    from runtime.offload import split as split_mod

    path, ref = tiny
    model = offloaded(path, hybrid=True, cpu_threads=1, n_slots=2 * LAYERS)
    eng, cost = model.experts, model.experts.cost
    cost.smoothing, cost.cpu_s = 0.0, 2 * cost.copy_s
    assert cost.assign(1) == (0, 1, 0) and cost.gpu_rows(0, 1, 0) == pytest.approx(0.5)
    inter = eng.layout.matrix("w1").shape[0]
    assert eng.split.max_rows == inter // 2 and eng.split.rows_for(0.5) == inter // 2
    assert eng.split.row_counts() == [inter // 2]  # each compiled and run at start-up
    seen = []
    real = split_mod.SplitScratch.gpu_hidden
    monkeypatch.setattr(split_mod.SplitScratch, "gpu_hidden", lambda self, *a: seen.append(a[2]) or real(self, *a))
    assert_same(ref, greedy(model))
    s = eng.stats()
    # a layer whose other miss is copied keeps the link busy: its split stays on the CPU (rows 0)
    assert s["split_experts"] > 0 and 0 < s["split_gpu_row_share"] <= 0.5
    assert seen and set(seen) == {inter // 2}


@pytest.mark.parametrize("cpu_copies", [1.0, 2.0])
def test_staged_w2_same_tokens(tiny, monkeypatch, cpu_copies):
    """--prefetch-w2: after each layer's copies, the w2 of the next layer's best guessed miss
    goes into the spare scratch set; a split of that expert copies only its GPU rows. Same
    tokens and logits as the resident model, with the CPU as fast as a copy and at half its
    speed (then the GPU also takes rows)."""
    from runtime.offload import split as split_mod

    path, ref = tiny
    model = offloaded(path, hybrid=True, stage_w2=True, cpu_threads=1, n_slots=2 * LAYERS, prefetch=0)
    eng = model.experts
    eng.cost.smoothing, eng.cost.cpu_s = 0.0, cpu_copies * eng.cost.copy_s
    assert len(eng.split.w2) == eng.top_k + 1
    w2_copies = []
    real = split_mod.SplitScratch.stage_w2
    monkeypatch.setattr(split_mod.SplitScratch, "stage_w2", lambda self, c, r, i: w2_copies.append(i) or real(self, c, r, i))
    assert_same(ref, greedy(model))
    s = eng.stats()
    st = s["staged_w2"]
    assert st["issued"] > 0 and st["used"] > 0 and st["used"] + st["wasted"] <= st["issued"]
    # every w2 copy is a staging or a split that found none staged: a staged split sends no w2
    assert len(w2_copies) == st["issued"] + s["split_experts"] - st["used"]
    assert s["uses"] == s["hits"] + s["misses"]


def test_staged_w2_goes_to_a_set_this_layer_does_not_read(tiny):
    """The staged copy is queued before this layer's splits ran their w2: it must take a set
    none of them uses. The split sets keep a staged expert in its set."""
    from runtime.offload.hybrid_steps import Staged, _split_sets

    path, _ = tiny
    eng = offloaded(path, hybrid=True, stage_w2=True, cpu_threads=1, n_slots=2 * LAYERS, prefetch=0).experts
    # layer 1's pool full: caching a miss there is no longer worth a whole copy (a free slot's)
    uncached = [k for k in range(EXPERTS) if (1, k) not in eng.cache]
    while eng.cache.reuse_value((1, uncached[-1])) == 1.0:
        eng.cache.insert((1, uncached.pop(0)))
    e = uncached[-1]
    eng.cost.smoothing, eng.cost.cpu_s = 0.0, 1e9  # a hopeless CPU would split nothing: nothing staged
    eng._stage_next(0, [(1, [e])], [])
    assert eng._staged is None and eng.staged_stats["issued"] == 0
    eng.cost.cpu_s = eng.cost.copy_s
    eng._stage_next(0, [(1, [e])], [0, 1])
    assert eng._staged.key == (1, e) and eng._staged.set == 2
    eng._stage_next(0, [(1, [e])], [1])
    assert eng._staged.set == 0
    eng._stage_next(0, [(2, [e])], [])  # no guess for layer 1: nothing staged, the old one stays
    assert eng._staged.set == 0
    staged = Staged((1, 5), 1, None)
    assert _split_sets([5, 3], staged, 3) == [1, 0]
    assert _split_sets([3, 5], staged, 3) == [0, 1]
    assert _split_sets([3, 4], None, 3) == [0, 1]
    assert _split_sets([3, 4], staged, 3) == [0, 2]


def test_staged_w2_needs_hybrid_and_replaces_prefetch(tiny):
    path, _ = tiny
    with pytest.raises(ConfigError, match="--prefetch-w2 .* --hybrid"):
        offloaded(path, stage_w2=True)
    with pytest.raises(ConfigError, match="--prefetch-w2 .* --hybrid"):
        OffloadOptions(prefetch_w2=True)
    # staging takes the place of whole-expert prefetch unless --prefetch asks for both
    eng = offloaded(path, hybrid=True, stage_w2=True, cpu_threads=1)
    assert eng.experts.prefetch == 0 and eng.experts._guess_n == eng.experts.top_k
    assert offloaded(path, hybrid=True, stage_w2=True, cpu_threads=1, prefetch=1).experts.prefetch == 1


def test_hybrid_split_follows_the_costs(tiny):
    path, ref = tiny
    model = offloaded(path, n_slots=2 * LAYERS, hybrid=True, cpu_threads=1)
    model.experts.cost.cpu_s, model.experts.cost.smoothing = 1e9, 0.0  # the CPU looks hopeless
    assert_same(ref, greedy(model))
    assert model.experts.stats()["cpu_experts"] == 0


def test_hybrid_reserves_its_scratch_in_the_plan(tiny, monkeypatch):
    """--hybrid's scratch sets (top_k of them: w2, and the GPU's rows of w1/w3 unless
    MOEPACK_SPLIT_ROWS=0) come out of the budget like any tensor, exactly what the engine
    allocates."""
    from runtime.offload import split

    path, _ = tiny
    file = MoepackFile(path)
    layout = file.header.expert_layout
    w2 = layout.matrix("w2").nbytes
    base = OffloadOptions(gpu_memory=10**9, expert_slots=None)
    hyb = OffloadOptions(gpu_memory=10**9, hybrid=True)
    a = preflight(file, base, torch.device("cpu"), torch.float32, CTX)
    b = preflight(file, hyb, torch.device("cpu"), torch.float32, CTX)
    k = file.config.num_experts_per_tok
    sets = split.SplitScratch(layout, k, torch.device("cpu"), torch.float32, rows=True)
    allocated = sum(t.numel() for t in [q.raw for q in sets.w2] + [b for p in sets.prefix for b in p.values()])
    assert sets.max_rows > 0 and b.reserve_bytes - a.reserve_bytes == allocated > k * w2
    staged = preflight(file, OffloadOptions(gpu_memory=10**9, hybrid=True, prefetch_w2=True), torch.device("cpu"),
                       torch.float32, CTX)
    assert staged.reserve_bytes - a.reserve_bytes == allocated * (k + 1) // k  # --prefetch-w2: one set more
    monkeypatch.setenv(split.ROWS_ENV, "0")
    c = preflight(file, hyb, torch.device("cpu"), torch.float32, CTX)
    assert c.reserve_bytes - a.reserve_bytes == k * w2


def test_a_free_slot_keeps_a_miss_on_the_link(tiny, monkeypatch):
    """With a free slot a miss is worth a whole copy later: behind the same four queued copies,
    the CPU at half a copy's speed only ties, and the tie goes to the copy (it stays cached)."""
    path, _ = tiny
    eng = offloaded(path, n_slots=2 * LAYERS, hybrid=True, cpu_threads=1).experts
    eng.cost.smoothing, eng.cost.cpu_s = 0.0, 2 * eng.cost.copy_s
    assert eng.cache.reuse_value((0, 0)) == 1.0
    monkeypatch.setattr(eng.copier, "pending_bytes", lambda: 4 * eng.layout.record_size)
    assert eng._cpu_choice(0, [0]) == ([], [], 0)


def test_copy_engine_pending_bytes_counts_the_unfinished_copies():
    class Event:
        def __init__(self, done: bool):
            self.done = done

        def query(self) -> bool:
            return self.done

    eng = CopyEngine(torch.device("cpu"))
    assert eng.pending_bytes() == 0
    # copies finish in issue order on one stream: the newest unfinished ones are the queue
    eng._copies.extend([(None, Event(True), 10), (None, Event(False), 20), (None, Event(False), 40)])
    assert eng.pending_bytes() == 60


def test_hybrid_counts_the_links_queue(tiny, monkeypatch):
    """A CPU at a quarter of a copy's speed loses a single miss to an idle link (even with half
    of w1/w3 on the GPU), and wins it when four copies (prefetches) are queued on the link
    ahead of it (layer 0's slots full, so caching the miss is worth the LRU cache's
    UNKNOWN_REUSE). At half a copy's speed the row split wins it even on an idle link."""
    path, _ = tiny
    model = offloaded(path, n_slots=2 * LAYERS, hybrid=True, cpu_threads=1)
    eng = model.experts
    eng.cost.smoothing, eng.cost.cpu_s = 0.0, 4 * eng.cost.copy_s
    for e in range(2):
        eng.cache.insert((0, e))
    miss = next(e for e in range(EXPERTS) if (0, e) not in eng.cache)
    assert eng.cache.reuse_value((0, miss)) == UNKNOWN_REUSE
    assert eng._cpu_choice(0, [miss]) == ([], [], 0)
    eng.cost.cpu_s = 2 * eng.cost.copy_s
    assert eng._cpu_choice(0, [miss]) == ([miss], [], eng.split.max_rows)
    eng.cost.cpu_s = 4 * eng.cost.copy_s
    monkeypatch.setattr(eng.copier, "pending_bytes", lambda: 4 * eng.layout.record_size)
    split, whole, _ = eng._cpu_choice(0, [miss])
    assert split + whole == [miss]


def test_split_rows_come_in_few_sizes():
    """Mixtral's shapes: the GPU's share of w1/w3 rows is rounded down to sixteenths of them
    and to 64-row steps, at most half: 8 GEMV shapes, all run at start-up, not in decode."""
    from runtime.offload import split
    from runtime.offload.synthfile import synthetic_header

    from .test_offload_helpers import RECIPE_4_2, mixtral_config

    layout = synthetic_header(mixtral_config(), RECIPE_4_2).expert_layout
    scratch = object.__new__(split.SplitScratch)  # the row arithmetic only: no buffers
    scratch.layout, scratch.max_rows, scratch.step = layout, split.max_rows(layout), split.row_step(layout)
    assert scratch.step == 64 and scratch.max_rows == 7168
    assert scratch.row_counts() == [896 * i for i in range(1, 9)]
    assert scratch.rows_for(0.0) == 0 and scratch.rows_for(0.2) == 2688 and scratch.rows_for(0.9) == 7168


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_token_goes_to_the_host_in_one_copy_unchanged(dtype):
    """The split layer's x and router weights reach the CPU as float32, the one-copy way (a
    GPU's) giving exactly the values of one cast and copy each."""
    from runtime.offload.engine import _to_host

    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(1, 64, generator=gen).to(dtype), torch.rand(1, 2, generator=gen).to(dtype)
    xh, wh = _to_host(x, w, one_copy=True)
    assert xh.dtype == wh.dtype == torch.float32 and xh.shape == (1, 64) and wh.shape == (1, 2)
    assert xh.is_contiguous() and torch.equal(xh, x.float()) and torch.equal(wh, w.float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode", ["waves", *HYBRID_MODES])
def test_half_precision_same_as_resident(tiny, dtype, mode):
    """The engine in the dtype a GPU runs (float16; bfloat16 on request): slots, scratch sets
    and the CPU experts' results in half precision give the resident model's tokens in that dtype."""
    path, _ = tiny
    resident, _ = load_model(path, "cpu", dtype, ctx=CTX)
    ref = greedy(resident)
    kw = dict(n_slots=LAYERS) if mode == "waves" else dict(hybrid=True, cpu_threads=1, **hybrid_kw(mode))
    model = offloaded(path, dtype=dtype, **kw)
    if mode != "waves":
        force_hybrid_mode(model, mode)
    assert_same(ref, greedy(model), tol=HALF_TOL[dtype])
    if mode != "waves":
        assert_hybrid_mode_ran(model, mode)
    assert model.experts.stats()["copies"] > 0
