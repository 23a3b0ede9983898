"""OffloadedExperts gives the all-resident runtime's results under every budget and policy:
tiny synthetic file, CPU "device" (synchronous copies), greedy tokens equal and logits close.
The hybrid mode (misses computed on the CPU, split experts, staged w2) is checked in
test_offload_hybrid.py; the shared setup is in offload_cases.py."""

from __future__ import annotations

import threading

import pytest
import torch

from formats.errors import ConfigError
from formats.reader import MoepackFile
from runtime.loader import load_model
from runtime.offload.engine import OffloadedExperts
from runtime.offload.host import HostStore, choose_resident
from runtime.offload.schedule import Load
from runtime.offload.options import OffloadOptions, make_backend_factory, preflight
from runtime.offload.streams import NULL_EVENT, CopyEngine
from runtime.offload.traces import SyntheticRouting, reference_params

from .offload_cases import CTX, EXPERTS, LAYERS, PROMPT, assert_same, greedy, offloaded, tiny  # noqa: F401 (tiny: a fixture)


@pytest.mark.parametrize("kw", [
    dict(n_slots=LAYERS),  # the minimum: one slot per layer, decode's two experts run in waves
    dict(n_slots=LAYERS + 1, prefetch=1),  # waves with prefetch evicting the only slot
    dict(n_slots=2 * LAYERS),  # top-k per layer: the prompt runs in waves of 2
    dict(n_slots=3 * LAYERS, prefetch=2),
    dict(n_slots=5 * LAYERS, prefetch=1, prefetch_layers=2),
    dict(n_slots=LAYERS * EXPERTS),  # everything fits
    dict(n_slots=2, policy="shared"),  # the shared minimum: one layer's top-k for every layer
    dict(n_slots=2, policy="shared", prefetch=2),
    dict(n_slots=2 * LAYERS, policy="shared", prefetch=2),
    dict(n_slots=4 * LAYERS + 1, policy="shared", prefetch=3, prefetch_layers=2),
    dict(n_slots=2 * LAYERS, policy="none"),
    dict(n_slots=LAYERS, policy="lfu", prefetch=2),
    dict(n_slots=3 * LAYERS, policy="lfu", prefetch=2),
    dict(n_slots=2, policy="shared-lfu"),
    dict(n_slots=LAYERS + 1, policy="shared-lfu", prefetch=2),
], ids=["layer1", "layer1+1-pf", "layer2", "layer3-pf", "layer5-pf2x2", "all", "shared-min", "shared-min-pf", "shared2-pf",
        "shared-pf3x2", "none", "lfu1-pf", "lfu3-pf", "shared-lfu-min", "shared-lfu-pf"])
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


def test_host_reader_waits_under_the_models_cuda_device(tiny, monkeypatch):
    """A reader thread's current CUDA device is device 0 unless set: waiting on a copy's event
    there would open a context on GPU 0 when the model runs on cuda:1."""
    path, _ = tiny
    current = []  # the device index in force on each thread that enters torch.cuda.device

    class Guard:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            current.append(self.index)

        def __exit__(self, *exc):
            current.pop()

    class Event:
        seen = []

        def synchronize(self):
            Event.seen.append(current[-1] if current else None)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", Guard)
    host = HostStore(MoepackFile(path), resident=[(2, 7)], pin=False, staging=1, io_threads=1, progress=False,
                     device="cuda:1")
    try:
        host.release(host.read_async((0, 0)), after=Event())  # a copy out of the buffer still in flight
        host.release(host.read_async((0, 1)))  # the one staging buffer again: its reader waits first
        assert Event.seen == [1]
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
        preflight(file, OffloadOptions(gpu_memory=plan.fixed_bytes + (LAYERS - 1) * rs), torch.device("cpu"), torch.float32, CTX)
    # a shared pool runs in one layer's top-k: the same budget works with it
    shared = preflight(file, OffloadOptions(gpu_memory=plan.fixed_bytes + (LAYERS - 1) * rs, cache_policy="shared"),
                       torch.device("cpu"), torch.float32, CTX)
    assert shared.n_slots == LAYERS - 1 and shared.min_slots == 2
    # left to its default, the policy becomes shared-lfu there instead of refusing the budget,
    # and the engine the factory builds runs it; a policy asked for is kept (the error above)
    auto = OffloadOptions(gpu_memory=plan.fixed_bytes + (LAYERS - 1) * rs, policy_given=False)
    assert preflight(file, auto, torch.device("cpu"), torch.float32, CTX).policy == "shared-lfu"
    model, _ = load_model(file, "cpu", torch.float32, expert_backend_factory=make_backend_factory(auto, ctx=CTX, progress=False),
                          ctx=CTX)
    assert model.experts.policy == "shared-lfu" and model.experts.cache.n_slots == LAYERS - 1
    assert_same(ref, greedy(model))
    assert preflight(file, OffloadOptions(gpu_memory=plan.fixed_bytes + 7 * rs + 100, policy_given=False),
                     torch.device("cpu"), torch.float32, CTX).policy == "layer"  # one slot per layer fits: kept
    auto_slots = preflight(file, OffloadOptions(expert_slots=LAYERS - 1, policy_given=False), torch.device("cpu"),
                           torch.float32, CTX)
    assert auto_slots.policy == "shared-lfu"
    with pytest.raises(ConfigError, match="smallest budget that works") as e:  # below a shared pool too
        preflight(file, OffloadOptions(gpu_memory=plan.fixed_bytes + rs, policy_given=False), torch.device("cpu"),
                  torch.float32, CTX)
    assert "2 expert slots" in e.value.message and "--cache-policy shared-lfu" in e.value.message
    assert "--gpu-memory" in e.value.hint
    with pytest.raises(ConfigError, match=f"--expert-slots {LAYERS - 1} .*--cache-policy layer"):
        preflight(file, OffloadOptions(expert_slots=LAYERS - 1), torch.device("cpu"), torch.float32, CTX)
    with pytest.raises(ConfigError, match="--expert-slots 1 .*--cache-policy shared"):
        preflight(file, OffloadOptions(expert_slots=1, cache_policy="shared"), torch.device("cpu"), torch.float32, CTX)
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
    dict(n_slots=LAYERS),
    dict(n_slots=2 * LAYERS),
    dict(n_slots=3 * LAYERS, prefetch=2),
    dict(n_slots=2, policy="shared"),
    dict(n_slots=2 * LAYERS, policy="shared", prefetch=2),
], ids=["layer1", "layer2", "layer3-pf", "shared-min", "shared2-pf"])
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


def test_free_events_per_compute_only_where_a_wave_reuses_the_slot():
    """A compute's slot gets its own "free" event only when a later load of the same layer
    overwrites it; the others share one event at the end of the layer."""
    from runtime.offload.engine import _reloaded_after
    from runtime.offload.schedule import Compute, Load

    ops = [Load((0, 1), 0, None, False), Load((0, 2), 1, None, False), Compute((0, 1), 0, False),
           Load((0, 3), 0, (0, 1), False), Compute((0, 2), 1, False), Compute((0, 3), 0, False)]
    assert _reloaded_after(ops) == {2}
    assert _reloaded_after([Compute((0, 1), 0, True), Compute((0, 2), 1, True)]) == set()


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


def test_default_prefetch_is_off_in_small_caches(tiny):
    """Without --prefetch: top-k guesses, except with no cache, with staged w2, and in caches of
    at most top-k + 1 slots per layer, where a wrong guess evicts what would have been reused."""
    from runtime.offload.engine import default_prefetch

    assert [default_prefetch("layer", n, 32, 2) for n in (32, 64, 96, 127, 128, 256)] == [0, 0, 0, 0, 2, 2]
    assert default_prefetch("lfu", 96, 32, 2) == 0 and default_prefetch("lfu", 160, 32, 2) == 2
    assert default_prefetch("shared-lfu", 2, 32, 2) == default_prefetch("shared", 96, 32, 2) == 0
    assert default_prefetch("shared", 128, 32, 2) == 2
    assert default_prefetch("none", 256, 32, 2) == 0 and default_prefetch("layer", 256, 32, 2, stage_w2=True) == 0
    path, _ = tiny
    assert offloaded(path, n_slots=3 * LAYERS).experts.prefetch == 0
    assert offloaded(path, n_slots=4 * LAYERS).experts.prefetch == 2
    assert offloaded(path, n_slots=LAYERS, prefetch=1).experts.prefetch == 1  # asked for: kept


class _Covers:
    """An event that stands for every compute issued before it (a sequence number)."""

    def __init__(self, seq: int):
        self.seq = seq

    def query(self):
        return True

    def synchronize(self):
        pass

    def record(self, stream=None):
        pass


class OrderedCopies(CopyEngine):
    """Copies that check, instead of racing: each copy into a slot or a split scratch set must
    wait on an event that covers the last compute that read that buffer. On a CPU device the
    copies run in order anyway, so identical tokens cannot show a missing wait (on a GPU it
    is a race); this can. The engine's reads are counted by wrapping where it takes a slot's
    record and where a split set is read."""

    def __init__(self, engine):
        super().__init__(torch.device("cpu"))
        self.reads, self.last_read, self.bufs, self.checked, self.violations = 0, {}, [], 0, []
        rs = engine.layout.record_size
        base = engine.slots.data_ptr()
        self.bufs += [(base + s * rs, base + (s + 1) * rs, ("slot", s)) for s in range(engine.slots.shape[0])]
        record_for = engine._record_for

        def read_slot(slot):  # the read follows: a streamed expert's copy is issued in record_for
            record = record_for(slot)
            self.read(("slot", slot))
            return record

        engine._record_for = read_slot
        sp = engine.split
        if sp is not None:
            for i, w2 in enumerate(sp.w2):
                self.bufs += [(t.data_ptr(), t.data_ptr() + t.numel(), ("set", i)) for t in (w2.raw, *sp.prefix[i].values())]
            hidden, apply = sp.gpu_hidden, sp.w2_apply

            def gpu_hidden(copier, i, rows, x, done):
                if copier is not None:
                    self.read(("set", i))
                return hidden(copier, i, rows, x, done)

            def w2_apply(copier, i, h, done):
                self.read(("set", i))
                return apply(copier, i, h, done)

            sp.gpu_hidden, sp.w2_apply = gpu_hidden, w2_apply

    def read(self, buf):
        self.reads += 1
        self.last_read[buf] = self.reads

    def mark_used(self):
        return _Covers(self.reads)

    def copy(self, dst, src, after=None):
        p = dst.data_ptr()
        buf = next((b for lo, hi, b in self.bufs if lo <= p < hi), None)
        if buf in self.last_read:
            self.checked += 1
            if getattr(after, "seq", 0) < self.last_read[buf]:
                self.violations.append(buf)
        super().copy(dst, src, after)
        return _Covers(-1)


@pytest.mark.parametrize("kw", [
    dict(n_slots=LAYERS), dict(n_slots=LAYERS + 1, prefetch=1), dict(n_slots=LAYERS, policy="lfu", prefetch=2, prefetch_layers=2),
    dict(n_slots=2, policy="shared-lfu", prefetch=2), dict(n_slots=3, policy="shared", prefetch=2, prefetch_layers=2),
    dict(n_slots=LAYERS, staging=2, resident=6), dict(n_slots=LAYERS, cuda_graphs=True),
    dict(n_slots=LAYERS, hybrid=True, stage_w2=True, prefetch=0, cpu_threads=1, cpu=1),
    dict(n_slots=2, policy="shared-lfu", hybrid=True, stage_w2=True, prefetch=0, cpu_threads=1, cpu=2),
], ids=["layer1", "layer1+1-pf", "lfu1-pf2x2", "shared-lfu-min-pf", "shared3-pf2x2", "layer1-stream", "layer1-graphs",
        "hybrid-w2-layer1", "hybrid-w2-shared-lfu-min"])
def test_no_copy_overwrites_a_buffer_before_its_last_read(tiny, kw):
    """At the smallest pools a layer's experts run in waves through the same slots, and split
    experts reuse their scratch sets: every copy into a slot or set waits for the compute that
    last read it, over a prompt and a decode (what a GPU's copy stream relies on)."""
    path, ref = tiny
    kw = dict(kw)
    cpu, resident = kw.pop("cpu", None), kw.pop("resident", None)
    if resident is not None:
        kw["host_resident"] = choose_resident(MoepackFile(path).header, resident)
    model = offloaded(path, **kw)
    eng = model.experts
    if cpu is not None:  # the CPU at `cpu` copies' time: misses split between both sides
        eng.cost.smoothing, eng.cost.cpu_s = 0.0, cpu * eng.cost.copy_s
    checker = eng.copier = OrderedCopies(eng)
    assert_same(ref, greedy(model))
    assert checker.checked > 0 and checker.violations == []
    if cpu is not None:
        assert eng.stats()["split_experts"] > 0
