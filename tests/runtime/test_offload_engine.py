"""OffloadedExperts gives the all-resident runtime's results under every budget and policy:
tiny synthetic file, CPU "device" (synchronous copies), greedy tokens equal and logits close."""

from __future__ import annotations

import threading

import pytest
import torch

from formats.errors import ConfigError
from formats.reader import MoepackFile
from runtime.loader import load_model
from runtime.offload.cache import UNKNOWN_REUSE
from runtime.offload.engine import OffloadedExperts
from runtime.offload.host import HostStore, choose_resident
from runtime.offload.schedule import Load
from runtime.offload.options import OffloadOptions, make_backend_factory, preflight
from runtime.offload.streams import NULL_EVENT, CopyEngine
from runtime.offload.traces import SyntheticRouting, reference_params

from .packing_helpers import CPU_KERNEL_TOL
from .test_offload_helpers import tiny_file

LAYERS, EXPERTS, CTX = 3, 8, 64
PROMPT = torch.tensor([5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 1])
NEW = 8


def greedy(model, prompt: torch.Tensor = PROMPT, new: int = NEW):
    """(all logits [steps, V] float32, generated tokens)."""
    out = [model(prompt, 0)]
    token, pos, tokens = int(out[0][-1].argmax()), prompt.numel(), []
    for _ in range(new):
        tokens.append(token)
        logits = model(torch.tensor([token]), pos, last_only=True)
        out.append(logits)
        token, pos = int(logits[-1].argmax()), pos + 1
    return torch.cat(out), tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_file(tmp_path_factory.mktemp("offload"), LAYERS, EXPERTS)
    model, _ = load_model(path, "cpu", torch.float32, ctx=CTX)
    return path, greedy(model)


def offloaded(path, **kw):
    def factory(file, model, device, dtype):
        opts = dict(n_slots=2 * LAYERS, router_weights=model.router_weights, progress=False)
        opts.update(kw)
        return OffloadedExperts(file, device, dtype, **opts)

    model, _ = load_model(path, "cpu", torch.float32, expert_backend_factory=factory, ctx=CTX)
    return model


def assert_same(ref, got, tol: float = CPU_KERNEL_TOL):
    ref_logits, ref_tokens = ref
    logits, tokens = got
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, rtol=tol, atol=tol)


@pytest.mark.parametrize("kw", [
    dict(n_slots=2 * LAYERS),  # the minimum: top-k per layer, the prompt runs in waves of 2
    dict(n_slots=3 * LAYERS, prefetch=2),
    dict(n_slots=5 * LAYERS, prefetch=1, prefetch_layers=2),
    dict(n_slots=LAYERS * EXPERTS),  # everything fits
    dict(n_slots=2 * LAYERS, policy="shared", prefetch=2),
    dict(n_slots=4 * LAYERS + 1, policy="shared", prefetch=3, prefetch_layers=2),
    dict(n_slots=2 * LAYERS, policy="none"),
    dict(n_slots=3 * LAYERS, policy="lfu", prefetch=2),
], ids=["layer2", "layer3-pf", "layer5-pf2x2", "all", "shared2-pf", "shared-pf3x2", "none", "lfu3-pf"])
def test_same_tokens_and_logits_as_resident(tiny, kw):
    path, ref = tiny
    model = offloaded(path, **kw)
    assert_same(ref, greedy(model))
    s = model.experts.stats()
    assert s["uses"] == s["hits"] + s["misses"] > 0
    assert s["bytes_copied"] == s["loads"] * MoepackFile(path).header.expert_layout.record_size
    if kw.get("policy") == "none":
        assert s["hits"] == 0
    if kw.get("prefetch"):
        assert s["prefetched"] > 0


def test_prompt_keeps_to_one_matrix_of_scratch(tiny, monkeypatch):
    """The engine's prompt asks for the one-matrix scratch its memory plan counts
    (kernels.fused_expert_ffn prompt_pair=False), not the resident path's w1 + w3 pair."""
    import runtime.offload.engine as engine_mod

    path, ref = tiny
    seen = []
    real = engine_mod.expert_ffn
    monkeypatch.setattr(engine_mod, "expert_ffn",
                        lambda *a, **k: seen.append((a[2].shape[0], k.get("prompt_pair", True))) or real(*a, **k))
    offloaded(path, n_slots=3 * LAYERS)(PROMPT, 0)
    assert seen and all(pair is False for t, pair in seen if t > 1)


def test_streaming_from_the_file_when_ram_is_short(tiny):
    """Only 9 of 24 experts in the host arena; the rest are read on demand through 2 staging
    buffers (so the ring wraps and buffers are reused many times)."""
    path, ref = tiny
    file = MoepackFile(path)
    resident = choose_resident(file.header, 9)
    model = offloaded(path, n_slots=3 * LAYERS, prefetch=2, host_resident=resident, staging=2, io_threads=2)
    assert_same(ref, greedy(model))
    s = model.experts.stats()
    assert s["host_resident_experts"] == 9 and s["host_streamed_experts"] == 15
    assert s["file_reads"] > 0 and s["file_read_bytes"] == s["file_reads"] * file.header.expert_layout.record_size
    model.experts.close()


def test_host_arena_holds_the_file_bytes(tiny):
    path, _ = tiny
    file = MoepackFile(path)
    host = HostStore(file, resident=[(2, 7), (0, 1), (1, 3)], pin=False, staging=1, io_threads=1, progress=False)
    try:
        for key in [(2, 7), (0, 1), (1, 3)]:
            assert bytes(host.view(key).numpy()) == bytes(file.expert_bytes(*key))
        assert host.view((0, 0)) is None
        p = host.read_async((0, 0))
        assert bytes(host.staged(p).numpy()) == bytes(file.expert_bytes(0, 0))
        host.release(p)
        assert host.file_reads == 1
    finally:
        host.close()


class LazyEvent:
    def __init__(self, engine, index):
        self.engine, self.index = engine, index

    def query(self):
        return self.engine.done > self.index

    def synchronize(self):
        self.engine.run_until(self.index)

    def record(self, stream=None):
        pass


class LazyCopies(CopyEngine):
    """A copy 'stream' that moves no byte until someone waits on the copy's event (then it
    runs every earlier copy too, in order): any read of a slot that is not ordered after its
    copy sees stale bytes, and any staging buffer reused before its copy ran corrupts it."""

    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.queue, self.done, self.lock = [], 0, threading.Lock()

    def copy(self, dst, src, after=None):
        self.bytes += src.numel()
        self.copies += 1
        self.queue.append((dst, src))
        return LazyEvent(self, len(self.queue) - 1)

    def run_until(self, index):
        with self.lock:
            while self.done <= index:
                dst, src = self.queue[self.done]
                dst.copy_(src)
                self.done += 1

    def wait(self, ready):
        if ready is not NULL_EVENT:
            ready.synchronize()


@pytest.mark.parametrize("resident", [None, 10])
def test_every_read_waits_for_its_copy(tiny, resident):
    path, ref = tiny
    file = MoepackFile(path)
    keys = None if resident is None else choose_resident(file.header, resident)
    model = offloaded(path, n_slots=2 * LAYERS + 2, prefetch=2, host_resident=keys, staging=2)
    lazy = LazyCopies()
    model.experts.copier = lazy
    assert_same(ref, greedy(model))
    assert lazy.copies > 0 and model.experts.stats()["misses"] > 0


def test_trace_routing_overrides_the_routers(tiny):
    path, _ = tiny
    model = offloaded(path, n_slots=3 * LAYERS, prefetch=2)
    routing = SyntheticRouting(reference_params(LAYERS, EXPERTS), guess_accuracy=1.0, seed=3)
    model.experts.routing = routing
    model(PROMPT, 0)
    model.experts.reset_stats()
    steps = 30
    for pos in range(PROMPT.numel(), PROMPT.numel() + steps):
        model(torch.tensor([1]), pos)
    s = model.experts.stats()
    # perfect guesses: every prefetched expert is used, and only layer 0 (never prefetched) misses
    assert s["uses"] == steps * LAYERS * 2
    assert s["prefetch_precision"] == 1.0 and s["prefetched"] > 0
    assert 0 < s["misses"] <= steps * 2


class _ReadSpy(torch.Tensor):
    reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            cls.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_trace_routing_still_waits_for_the_router(tiny):
    """Trace routing replaces the router's choice but still reads it once per layer: the host
    may not learn a layer's experts (and start their copies) before the layer before it ran."""
    path, _ = tiny
    model = offloaded(path, n_slots=3 * LAYERS, prefetch=0)
    model.experts.routing = SyntheticRouting(reference_params(LAYERS, EXPERTS), guess_accuracy=1.0, seed=3)
    x = torch.randn(1, model.experts.file.config.hidden_size)
    idx, w = torch.tensor([[0, 1]]).as_subclass(_ReadSpy), torch.tensor([[0.5, 0.5]])
    _ReadSpy.reads = 0
    for layer in range(LAYERS):
        model.experts.forward(layer, x, idx, w)
    assert _ReadSpy.reads == LAYERS


def test_factory_plans_slots_from_the_budget(tiny):
    path, ref = tiny
    file = MoepackFile(path)
    rs = file.header.expert_layout.record_size
    opts = OffloadOptions(gpu_memory=10**12, prefetch=0)
    plan = preflight(file, opts, torch.device("cpu"), torch.float32, CTX)
    assert plan.all_resident
    small = OffloadOptions(gpu_memory=plan.fixed_bytes + 7 * rs + 100)
    plan = preflight(file, small, torch.device("cpu"), torch.float32, CTX)
    assert plan.n_slots == 7
    factory = make_backend_factory(small, ctx=CTX, progress=False)
    model, _ = load_model(file, "cpu", torch.float32, expert_backend_factory=factory, ctx=CTX)
    # the loaded model's real size replaces the header estimate; on the CPU they agree
    assert model.experts.cache.n_slots == 7
    assert_same(ref, greedy(model))
    with pytest.raises(ConfigError, match="smallest budget that works"):
        preflight(file, OffloadOptions(gpu_memory=plan.fixed_bytes + 5 * rs), torch.device("cpu"), torch.float32, CTX)
    with pytest.raises(ConfigError, match="--expert-slots 3"):
        preflight(file, OffloadOptions(expert_slots=3), torch.device("cpu"), torch.float32, CTX)
    assert preflight(file, OffloadOptions(), torch.device("cpu"), torch.float32, CTX) is None  # nothing asked: resident


def test_option_errors(tiny):
    path, _ = tiny
    file = MoepackFile(path)
    with pytest.raises(ConfigError, match="--prefetch needs a cache"):
        OffloadedExperts(file, "cpu", torch.float32, n_slots=6, policy="none", prefetch=2, progress=False)
    with pytest.raises(ConfigError, match="--prefetch 9"):
        OffloadedExperts(file, "cpu", torch.float32, n_slots=6, prefetch=9, router_weights=lambda L: None, progress=False)


def test_tiny_checkpoint_file(file42):
    """The quantized tiny HF checkpoint (4 experts per layer, 2-bit): tight per-layer cache
    with prefetch, and a shared pool, both match the resident runtime."""
    ref_model, _ = load_model(file42, "cpu", torch.float32, ctx=CTX)
    ref = greedy(ref_model)
    for kw in (dict(policy="layer", prefetch=2), dict(policy="shared", prefetch=1, prefetch_layers=2)):
        def factory(file, model, device, dtype, kw=kw):
            L = file.config.num_hidden_layers
            return OffloadedExperts(file, device, dtype, n_slots=2 * L + 1, router_weights=model.router_weights,
                                    progress=False, **kw)

        model, _ = load_model(file42, "cpu", torch.float32, expert_backend_factory=factory, ctx=CTX)
        assert_same(ref, greedy(model))
        assert model.experts.stats()["misses"] > 0


@pytest.mark.parametrize("kw", [
    dict(n_slots=2 * LAYERS),
    dict(n_slots=3 * LAYERS, prefetch=2),
    dict(n_slots=2 * LAYERS, policy="shared", prefetch=2),
], ids=["layer2", "layer3-pf", "shared2-pf"])
def test_graph_interface_same_tokens(tiny, kw):
    """cuda_graphs=True on the CPU runs runtime.graphs.ExpertGraphs eagerly through the same
    set_input / run(slot) calls the CUDA graphs replay: the decode path that feeds it (one input
    per layer, slots refilled under it) must give the resident model's tokens."""
    path, ref = tiny
    model = offloaded(path, cuda_graphs=True, **kw)
    assert_same(ref, greedy(model))
    g = model.experts.graphs
    assert g is not None and not g.capturing and g.replays > 0
    assert model.experts.stats()["cuda_graphs"] is False  # nothing captured on the CPU


@pytest.mark.parametrize("kw", [
    dict(n_slots=2 * LAYERS),
    dict(n_slots=3 * LAYERS, prefetch=2),
    dict(n_slots=3 * LAYERS, policy="lfu", cuda_graphs=True),
], ids=["layer2", "layer3-pf", "lfu3-graph-interface"])
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


def test_free_events_per_compute_only_where_a_wave_reuses_the_slot():
    """A compute's slot gets its own "free" event only when a later load of the same layer
    overwrites it; the others share one event at the end of the layer."""
    from runtime.offload.engine import _reloaded_after
    from runtime.offload.schedule import Compute, Load

    ops = [Load((0, 1), 0, None, False), Load((0, 2), 1, None, False), Compute((0, 1), 0, False),
           Load((0, 3), 0, (0, 1), False), Compute((0, 2), 1, False), Compute((0, 3), 0, False)]
    assert _reloaded_after(ops) == {2}
    assert _reloaded_after([Compute((0, 1), 0, True), Compute((0, 2), 1, True)]) == set()


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


@pytest.mark.parametrize("kw", [dict(n_slots=3 * LAYERS, prefetch=2), dict(n_slots=4 * LAYERS, policy="lfu"),
                                dict(n_slots=2 * LAYERS, policy="none"),
                                dict(n_slots=3 * LAYERS, hybrid=True, stage_w2=True, prefetch=0, cpu_threads=1)],
                         ids=["layer3-pf", "lfu4", "none", "hybrid-w2"])
def test_all_hit_steps_launch_before_the_plan(tiny, kw):
    """A decode step whose experts are all cached launches them before the cache's bookkeeping:
    the plan then holds exactly those hits (pinned, so no load of the step touches their
    slots), the uses are counted once, and the tokens are the resident model's. The "none"
    policy never takes that path (every use loads again)."""
    path, ref = tiny
    model = offloaded(path, **kw)
    eng = model.experts
    events, early_steps = [], []
    real_plan, real_expert = eng.planner.plan, eng._decode_expert

    def plan(layer, needed, guesses=()):
        ops = real_plan(layer, needed, guesses)
        events.append(("plan", ops))
        return ops

    def decode_expert(slot, *a):
        events.append(("launch", slot))
        return real_expert(slot, *a)

    eng.planner.plan, eng._decode_expert = plan, decode_expert
    forward = eng.forward

    def step(layer, x, idx, w):
        events.clear()
        y = forward(layer, x, idx, w)
        kinds = [k for k, _ in events]
        if idx.shape[0] == 1 and kinds[:1] == ["launch"]:  # launched before the plan
            launched = [v for k, v in events if k == "launch"]
            ops = next(v for k, v in events if k == "plan")
            computes = [op for op in ops if not isinstance(op, Load)]
            assert kinds == ["launch"] * len(launched) + ["plan"] and all(op.hit for op in computes)
            assert sorted(op.slot for op in computes) == sorted(launched)
            assert not {op.slot for op in ops if isinstance(op, Load)} & set(launched)
            early_steps.append(layer)
        return y

    eng.forward = step
    assert_same(ref, greedy(model))
    s = eng.stats()
    assert s["uses"] == s["hits"] + s["misses"]
    assert (not early_steps) if kw.get("policy") == "none" else early_steps
