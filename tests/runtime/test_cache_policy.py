"""The pure cache policies and the per-layer schedule, checked against an independent,
deliberately plain LRU simulator on hypothesis-generated routing traces."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formats.errors import ConfigError
from runtime.offload.cache import ExpertCache, FrequencyCache, NoCache, calibration_prior, make_cache
from runtime.offload.schedule import Compute, Load, Planner, simulate


# -- the reference: lists, no OrderedDict, no pools, no shared code with the planner --------------
class RefLRU:
    """LRU sets of (layer, expert), one per pool; index 0 is the least recently used."""

    def __init__(self, capacity: dict, shared: bool):
        self.cap, self.shared = capacity, shared
        self.lists = {p: [] for p in capacity}

    def pool(self, layer):
        return None if self.shared else layer

    def has(self, key):
        return key in self.lists[self.pool(key[0])]

    def use(self, key):
        lst = self.lists[self.pool(key[0])]
        lst.remove(key)
        lst.append(key)

    def add(self, key, pinned):
        """Insert; returns (ok, evicted)."""
        lst = self.lists[self.pool(key[0])]
        evicted = None
        if len(lst) >= self.cap[self.pool(key[0])]:
            victims = [k for k in lst if k not in pinned]
            if not victims:
                return False, None
            evicted = victims[0]
            lst.remove(evicted)
        lst.append(key)
        return True, evicted


def reference_stats(ref: RefLRU, steps, prefetch: int, no_cache: bool = False) -> dict:
    s = dict(uses=0, hits=0, misses=0, loads=0, prefetched=0, prefetch_used=0, evictions=0)
    outstanding = set()
    for layer, needed, guesses in steps:
        keys = [(layer, e) for e in needed]
        pinned = set()
        misses = []
        for k in keys:
            if not no_cache and ref.has(k):
                ref.use(k)
                s["hits"] += 1
                pinned.add(k)
                if k in outstanding:
                    s["prefetch_used"] += 1
            else:
                if no_cache and ref.has(k):
                    ref.lists[ref.pool(layer)].remove(k)
                misses.append(k)
        s["uses"] += len(keys)
        s["misses"] += len(misses)
        outstanding = {k for k in outstanding if k[0] != layer}
        for k in misses:
            ok, ev = ref.add(k, pinned)
            assert ok, "decode traces never need waves"
            pinned.add(k)
            s["loads"] += 1
            if ev is not None:
                s["evictions"] += 1
                outstanding.discard(ev)
        for target, ranked in guesses:
            for e in ranked[:prefetch]:
                k = (target, e)
                if ref.has(k):
                    ref.use(k)
                    pinned.add(k)
                    continue
                ok, ev = ref.add(k, pinned)
                if not ok:
                    break
                pinned.add(k)
                outstanding.add(k)
                s["loads"] += 1
                s["prefetched"] += 1
                if ev is not None:
                    s["evictions"] += 1
                    outstanding.discard(ev)
    return s


@st.composite
def traces(draw):
    layers = draw(st.integers(1, 4))
    experts = draw(st.integers(2, 8))
    k = draw(st.integers(1, min(2, experts)))
    prefetch = draw(st.integers(0, experts))
    ahead = draw(st.integers(1, 2))
    tokens = draw(st.integers(1, 12))
    # skewed draws so some experts repeat often (a uniform trace rarely hits)
    expert = st.one_of(st.integers(0, min(2, experts - 1)), st.integers(0, experts - 1))
    steps = []
    for _ in range(tokens):
        for layer in range(layers):
            needed = draw(st.lists(expert, min_size=k, max_size=k, unique=True))
            guesses = []
            if prefetch:
                for t in range(layer + 1, min(layer + 1 + ahead, layers)):
                    guesses.append((t, draw(st.lists(expert, min_size=prefetch, max_size=prefetch, unique=True))))
            steps.append((layer, needed, guesses))
    return layers, experts, k, prefetch, steps


def _planner_stats(p: Planner) -> dict:
    d = p.stats.to_json()
    return {k: d[k] for k in ("uses", "hits", "misses", "loads", "prefetched", "prefetch_used", "evictions")}


@settings(max_examples=80, deadline=None)
@given(traces(), st.data())
def test_per_layer_lru_matches_reference(trace, data):
    layers, experts, k, prefetch, steps = trace
    caps = [data.draw(st.integers(k, experts)) for _ in range(layers)]
    planner = Planner(ExpertCache.per_layer(caps), prefetch)
    simulate(planner, steps)
    ref = RefLRU({L: c for L, c in enumerate(caps)}, shared=False)
    assert _planner_stats(planner) == reference_stats(ref, steps, prefetch)


@settings(max_examples=80, deadline=None)
@given(traces(), st.data())
def test_shared_lru_matches_reference(trace, data):
    layers, experts, k, prefetch, steps = trace
    n = data.draw(st.integers(layers * k, layers * experts))
    planner = Planner(ExpertCache.shared(n), prefetch)
    simulate(planner, steps)
    ref = RefLRU({None: n}, shared=True)
    assert _planner_stats(planner) == reference_stats(ref, steps, prefetch)


@settings(max_examples=60, deadline=None)
@given(traces())
def test_no_cache_misses_every_use(trace):
    layers, experts, k, _, steps = trace
    steps = [(L, needed, []) for L, needed, _ in steps]
    planner = Planner(NoCache.per_layer([k] * layers), 0)
    st_ = simulate(planner, steps)
    assert st_.hits == 0 and st_.loads == st_.uses == sum(len(n) for _, n, _ in steps)
    assert _planner_stats(planner) == reference_stats(RefLRU({L: k for L in range(layers)}, False), steps, 0, no_cache=True)


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_schedule_never_reads_an_overwritten_slot(data):
    """Prefill-sized needs (more experts than slots) run in waves; replaying the ops on a
    slot table, every Compute finds its own expert in its slot, and every needed expert is
    computed exactly once."""
    layers = data.draw(st.integers(1, 3))
    experts = data.draw(st.integers(2, 8))
    kind = data.draw(st.sampled_from(["shared", "shared-lfu", "layer", "lfu"]))
    prefetch = data.draw(st.integers(0, experts))
    cls = FrequencyCache if kind.endswith("lfu") else ExpertCache
    # down to the smallest pools the engine accepts (budget.min_expert_slots): 1 per layer, or
    # fewer shared slots than layers, where even a decode step's experts come in waves
    if kind.startswith("shared"):
        cache = cls.shared(data.draw(st.integers(1, layers * experts)))
    else:
        cache = cls.per_layer([data.draw(st.integers(1, experts)) for _ in range(layers)])
    planner = Planner(cache, prefetch)
    table: dict[int, tuple] = {}
    for _ in range(data.draw(st.integers(1, 6))):
        for layer in range(layers):
            needed = data.draw(st.lists(st.integers(0, experts - 1), min_size=1, max_size=experts, unique=True))
            target = layer + 1
            guesses = [(target, data.draw(st.lists(st.integers(0, experts - 1), max_size=experts, unique=True)))] if target < layers else []
            ops = planner.plan(layer, needed, guesses)
            computed = []
            for op in ops:
                if isinstance(op, Load):
                    if op.evicted is not None:
                        assert table.get(op.slot) == op.evicted
                    table[op.slot] = op.key
                else:
                    assert table.get(op.slot) == op.key, f"{op} reads a slot holding {table.get(op.slot)}"
                    computed.append(op.key[1])
            assert sorted(computed) == sorted(needed)
            # the cache's view agrees with the replayed slot table
            for key in cache.keys():
                assert table[cache.slot_of(key)] == key
            assert not cache.pinned


def test_lru_evicts_least_recently_used():
    c = ExpertCache.per_layer([3])
    for e in (0, 1, 2):
        c.insert((0, e))
    c.lookup((0, 0))  # 1 is now the least recently used
    slot, evicted = c.insert((0, 3))
    assert evicted == (0, 1) and slot == 1
    assert c.keys() == [(0, 2), (0, 0), (0, 3)]


def test_pinned_entries_are_never_evicted():
    c = ExpertCache.per_layer([2])
    c.insert((0, 0))
    c.insert((0, 1))
    c.pin((0, 0))
    assert c.insert((0, 2)) == (1, (0, 1))
    c.pin((0, 2))
    assert c.insert((0, 3)) is None  # everything pinned: the insert is refused, nothing changes
    assert sorted(c.keys()) == [(0, 0), (0, 2)]
    c.unpin_all()
    assert c.insert((0, 3))[1] == (0, 0)


def test_per_layer_pools_are_separate_and_shared_pool_is_global():
    c = ExpertCache.per_layer([1, 1])
    c.insert((0, 0))
    assert c.insert((1, 0)) == (1, None)  # layer 1 has its own slot
    assert c.insert((0, 1)) == (0, (0, 0))
    s = ExpertCache.shared(2)
    s.insert((0, 0))
    s.insert((1, 0))
    assert s.insert((1, 1)) == (0, (0, 0))  # the oldest entry of any layer


def test_prefetch_loads_enter_the_cache_and_count_when_used():
    p = Planner(ExpertCache.per_layer([2, 2]), prefetch=2)
    ops = p.plan(0, [0, 1], [(1, [5, 6])])
    loads = [op for op in ops if isinstance(op, Load)]
    assert [(op.key, op.prefetch) for op in loads] == [((0, 0), False), ((0, 1), False), ((1, 5), True), ((1, 6), True)]
    # prefetch loads are issued before the layer's computes, after its own loads
    assert isinstance(ops[4], Compute)
    ops = p.plan(1, [5, 7])  # one right guess, one wrong
    assert [op.hit for op in ops if isinstance(op, Compute)] == [True, False]
    assert (p.stats.prefetched, p.stats.prefetch_used) == (2, 1)
    assert p.stats.prefetch_precision == 0.5
    assert p.stats.prefetch_recall == 1 / 4
    assert p.stats.prefetch_wasted == 1


def test_prefetch_never_evicts_what_the_current_layer_needs():
    # shared pool of 2: layer 0 needs both slots, so the guess for layer 1 must wait
    p = Planner(ExpertCache.shared(2), prefetch=1)
    ops = p.plan(0, [0, 1], [(1, [3])])
    assert not any(isinstance(op, Load) and op.prefetch for op in ops)
    assert sorted(p.cache.keys()) == [(0, 0), (0, 1)]


def test_guessed_expert_already_cached_is_kept():
    p = Planner(ExpertCache.per_layer([1, 2]), prefetch=2)
    p.plan(1, [4, 5])
    p.plan(0, [0], [(1, [5, 6])])  # 5 is cached: touched, so 6 evicts 4 rather than 5
    assert sorted(p.cache.keys()) == [(0, 0), (1, 5), (1, 6)]


def test_make_cache_validates():
    with pytest.raises(ConfigError, match="too few for --cache-policy layer over 2 layers: it needs 2"):
        make_cache("layer", 1, 2, 2)
    with pytest.raises(ConfigError, match="too few for --cache-policy shared over 2 layers: it needs 2"):
        make_cache("shared", 1, 2, 2)
    assert make_cache("layer", 2, 2, 2).n_slots == make_cache("shared", 2, 2, 2).n_slots == 2
    with pytest.raises(ConfigError, match="cache-policy"):
        make_cache("fifo", 8, 2, 2)
    assert make_cache("lfu", 8, 2, 2).policy == "lfu"
    shared = make_cache("shared-lfu", 3, 2, 2, prior={(1, 4): 5.0})
    assert shared.policy == "lfu" and shared.n_slots == 3 and shared.capacity(0) == shared.capacity(1) == 3
    assert shared.freq[(1, 4)] == 5.0
    assert make_cache("none", 100, 2, 2).n_slots == 4  # no cache: top-k slots per layer are all it uses
    assert [make_cache("layer", 7, 3, 2).capacity(L) for L in range(3)] == [3, 2, 2]


# -- the frequency policy ("lfu") ----------------------------------------------------------------
def test_lfu_evicts_the_least_used_then_the_least_recent():
    c = FrequencyCache.per_layer([3])
    for e in (0, 1, 2):
        c.lookup((0, e))  # a miss counts as a use
        c.insert((0, e))
    for _ in range(3):
        c.lookup((0, 0))  # 0: 4 uses, 1 and 2: 1 use each
    c.lookup((0, 1))  # 1: 2 uses; 2 is now the least used
    c.lookup((0, 3))
    assert c.insert((0, 3))[1] == (0, 2)
    # 1 (2 uses) and 3 (1 use): 3 goes although it is the most recent
    c.lookup((0, 4))
    assert c.insert((0, 4))[1] == (0, 3)
    # ties: of the least used, the least recently used goes (1 and 4 both at 2 uses, 4 used last)
    c.lookup((0, 4))
    assert c.freq[(0, 1)] == c.freq[(0, 4)] == 2
    c.lookup((0, 5))
    assert c.insert((0, 5))[1] == (0, 1)


def test_lfu_never_evicts_pinned_and_keeps_counts_of_evicted_experts():
    c = FrequencyCache.per_layer([2])
    for e in (0, 1):
        c.lookup((0, e))
        c.insert((0, e))
    c.pin((0, 0))
    c.lookup((0, 1))
    c.lookup((0, 1))
    assert c.insert((0, 2))[1] == (0, 1)  # 0 is less used but pinned
    assert c.freq[(0, 1)] == 3  # remembered after eviction
    c.pin((0, 2))
    assert c.insert((0, 3)) is None  # everything pinned


def test_lfu_prior_from_calibration_counts():
    prior = calibration_prior(((30, 10, 0, 0), (1, 1, 1, 1)), weight=8)
    assert prior[(0, 0)] == 6 and prior[(0, 1)] == 2 and prior[(0, 2)] == 0 and prior[(1, 3)] == 2
    assert calibration_prior(None) is None
    c = make_cache("lfu", 4, 2, 2, prior=prior)
    for e in (0, 2):
        c.lookup((0, e))
        c.insert((0, e))
    c.lookup((0, 2))
    c.lookup((0, 2))  # expert 2: 2 uses, expert 0: 1 use + a prior of 6
    c.lookup((0, 3))
    assert c.insert((0, 3))[1] == (0, 2)


def test_lfu_beats_lru_on_the_reference_trace():
    """On traces calibrated to real Mixtral routing (skewed per layer), frequency keeps more of
    the experts that will be used again than recency does, at 4-5 slots per layer."""
    from runtime.offload.traces import SyntheticRouting, reference_params, trace_steps

    params = reference_params(8, 8)
    for per_layer in (4, 5):
        rates = {}
        for policy in ("layer", "lfu"):
            steps = trace_steps(SyntheticRouting(params, 0.8, seed=1), 400, 0)
            rates[policy] = simulate(Planner(make_cache(policy, per_layer * 8, 8, 2), 0), steps).hit_rate
        assert rates["lfu"] > rates["layer"] + 0.02, rates


def test_reuse_value_is_frequency_admission():
    """LFU: a whole copy while a slot is free; else the share of its uses by which the key
    beats the entry it would evict; nothing for a key colder than that entry. LRU cannot tell
    (UNKNOWN_REUSE once full); the no-cache baseline keeps nothing."""
    from runtime.offload.cache import UNKNOWN_REUSE

    c = FrequencyCache({0: [0, 1]}, prior={(0, 0): 4.0, (0, 1): 2.0, (0, 2): 8.0, (0, 3): 1.0})
    assert c.reuse_value((0, 2)) == 1.0
    c.insert((0, 0))
    c.insert((0, 1))
    assert c.reuse_value((0, 2)) == pytest.approx((8 - 2) / 8)  # would evict (0, 1), used twice
    assert c.reuse_value((0, 3)) == 0.0  # colder than both: a copy would push out a warmer one
    c.pin((0, 0))
    c.pin((0, 1))
    assert c.reuse_value((0, 2)) == 0.0  # nothing can leave
    lru = ExpertCache.per_layer([1])
    assert lru.reuse_value((0, 5)) == 1.0
    lru.insert((0, 4))
    assert lru.reuse_value((0, 5)) == UNKNOWN_REUSE
    assert NoCache.per_layer([2]).reuse_value((0, 1)) == 0.0


def test_hit_slot_is_a_lookup_that_counts_nothing():
    """The engine launches a step's experts before its plan when every one would hit
    (OffloadedExperts.forward): hit_slot must agree with lookup and leave the order and counts
    alone; the "none" policy never hits, though its last loads are still in their slots."""
    for policy in ("layer", "shared", "lfu", "none"):
        cache = make_cache(policy, 4, 2, 2)
        for key in ((0, 1), (0, 2)):
            cache.insert(key)
        cache.unpin_all()
        order = cache.keys()
        if policy == "none":
            assert (0, 1) in cache and cache.hit_slot((0, 1)) is None
            continue
        assert cache.hit_slot((0, 1)) == cache.slot_of((0, 1)) is not None and cache.hit_slot((0, 3)) is None
        assert cache.keys() == order  # nothing moved
        assert cache.hit_slot((0, 1)) == cache.lookup((0, 1))


def test_shared_lfu_keeps_the_busiest_experts_where_shared_lru_thrashes():
    """A decode step visits the layers in a cycle. A shared LRU pool smaller than a token's uses
    evicts every expert before its next use; counting uses keeps the busiest ones (here expert 0
    of layers 0 and 1, used every token) and hits them every token, while the other slots
    take the rarely reused experts."""
    layers, slots, tokens = 4, 4, 20

    def hits(policy):
        p = Planner(make_cache(policy, slots, layers, 2), prefetch=0)
        for t in range(tokens):
            if t == tokens // 2:
                p.reset_stats()  # counted from here: the steady state
            for L in range(layers):
                spin = [1 + (3 * t + L) % 7, 1 + (3 * t + L + 3) % 7]  # two distinct rarely repeated experts
                p.plan(L, [0, spin[0]] if L < 2 else spin)
        return p.stats.hits

    assert hits("shared") == 0
    assert hits("shared-lfu") >= 2 * (tokens // 2)  # both hot experts, every token


def test_admission_bypass_tool_keeps_warm_experts_and_drops_cold_ones(monkeypatch):
    """tools/admission_sim.py (BENCHMARKS.md section 32): a cold miss goes through a bypass slot
    and leaves after its compute; the warm resident stays; every compute reads its own expert."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "tools"))
    from admission_sim import BypassLFU, loads_per_token

    cache = BypassLFU({0: [0]}, bypass_slots=[1])
    planner = Planner(cache, 0)
    table = {}
    for needed in ([0], [0], [0, 1], [2, 0], [3]):
        for op in planner.plan(0, needed):
            if isinstance(op, Load):
                table[op.slot] = op.key
            else:
                assert table[op.slot] == op.key
        assert cache.keys() == [(0, 0)] and not cache.transient and not cache.pinned
    assert cache.bypassed == 3 and planner.stats.loads == 4
    loads, bypassed = loads_per_token(False, 64, 1, 32, 20, 0)
    assert 0 < bypassed <= loads * 20
