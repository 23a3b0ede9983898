"""Which expert lives in which GPU slot: pure-Python cache policies (no torch), so they can
be tested against an independent simulator and reused by the benchmark's simulations.

A key is (layer, expert); a slot is a row of the engine's [n_slots, record_size] tensor.
Entries can be pinned: a pinned entry is never chosen as a victim. The engine pins what the
current layer still has to compute and what it has just started to prefetch, so a load can
never overwrite an expert that is about to be read.
"""

from __future__ import annotations

from collections import OrderedDict

from formats.errors import ConfigError

Key = tuple[int, int]


class _LRUPool:
    """One LRU-ordered set of slots. `entries` maps key -> slot, least recently used first."""

    def __init__(self, slots: list[int]):
        self.slots = list(slots)
        self.free = list(reversed(self.slots))  # pop() hands out the lowest slot first
        self.entries: OrderedDict[Key, int] = OrderedDict()

    def victim(self, pinned: set[Key]) -> Key | None:
        for key in self.entries:
            if key not in pinned:
                return key
        return None

    def insert(self, key: Key, pinned: set[Key]) -> tuple[int, Key | None] | None:
        if self.free:
            slot, evicted = self.free.pop(), None
        else:
            evicted = self.victim(pinned)
            if evicted is None:
                return None
            slot = self.entries.pop(evicted)
        self.entries[key] = slot
        return slot, evicted

    def remove(self, key: Key) -> None:
        self.free.append(self.entries.pop(key))


class ExpertCache:
    """LRU over expert slots, in pools: one pool per layer ("layer") or one for all ("shared").

    lookup() is a use (it refreshes recency); touch() refreshes without being a use;
    insert() takes a free slot or evicts the least recently used unpinned entry of the key's
    pool and returns (slot, evicted key or None), or None when every entry there is pinned.
    """

    policy = "lru"

    def __init__(self, pools: dict[int | None, list[int]]):
        self._pools = {k: _LRUPool(v) for k, v in pools.items()}
        self._where: dict[Key, _LRUPool] = {}
        self.pinned: set[Key] = set()

    # -- construction -------------------------------------------------------------------
    @classmethod
    def per_layer(cls, slots_per_layer: list[int]) -> "ExpertCache":
        pools, start = {}, 0
        for L, n in enumerate(slots_per_layer):
            pools[L] = list(range(start, start + n))
            start += n
        return cls(pools)

    @classmethod
    def shared(cls, n_slots: int) -> "ExpertCache":
        return cls({None: list(range(n_slots))})

    def _pool(self, layer: int) -> _LRUPool:
        pool = self._pools.get(layer) or self._pools.get(None)
        if pool is None:
            raise KeyError(f"no slots for layer {layer}")
        return pool

    # -- queries ------------------------------------------------------------------------
    @property
    def n_slots(self) -> int:
        return sum(len(p.slots) for p in self._pools.values())

    def capacity(self, layer: int) -> int:
        return len(self._pool(layer).slots)

    def __contains__(self, key: Key) -> bool:
        return key in self._where

    def slot_of(self, key: Key) -> int | None:
        pool = self._where.get(key)
        return None if pool is None else pool.entries[key]

    def hit_slot(self, key: Key) -> int | None:
        """The slot a lookup of `key` would hit now, without counting the use (None: it would
        miss)."""
        return self.slot_of(key)

    def keys(self) -> list[Key]:
        """All cached keys, least recently used first within each pool."""
        return [k for p in self._pools.values() for k in p.entries]

    def reuse_value(self, key: Key) -> float:
        """What caching the missed `key` now is worth later, in copies (offload.hybrid's reuse
        charge for computing it on the CPU instead): a whole copy while its pool has a free
        slot (every later use hits); otherwise UNKNOWN_REUSE, since recency says nothing about
        whether the key or its victim will be needed first."""
        return 1.0 if self._pool(key[0]).free else UNKNOWN_REUSE

    # -- updates ------------------------------------------------------------------------
    def lookup(self, key: Key) -> int | None:
        """The key's slot (and it becomes most recently used), or None on a miss."""
        pool = self._where.get(key)
        if pool is None:
            return None
        pool.entries.move_to_end(key)
        return pool.entries[key]

    def touch(self, key: Key) -> bool:
        return self.lookup(key) is not None

    def insert(self, key: Key) -> tuple[int, Key | None] | None:
        if key in self._where:
            raise ValueError(f"expert {key} is already cached")
        pool = self._pool(key[0])
        got = pool.insert(key, self.pinned)
        if got is None:
            return None
        slot, evicted = got
        if evicted is not None:
            del self._where[evicted]
        self._where[key] = pool
        return slot, evicted

    def discard(self, key: Key) -> None:
        pool = self._where.pop(key, None)
        if pool is not None:
            pool.remove(key)
        self.pinned.discard(key)

    def pin(self, key: Key) -> None:
        if key not in self._where:
            raise ValueError(f"expert {key} is not cached and cannot be pinned")
        self.pinned.add(key)

    def unpin(self, key: Key) -> None:
        self.pinned.discard(key)

    def unpin_all(self) -> None:
        self.pinned.clear()


# the reuse charge when a cache cannot tell (LRU with a full pool): tools/hybrid_projection.py,
# 16 GiB, LFU, t_cpu 1.2 ms against t_copy 1.24 ms: 55.7 tok/s projected with no charge, 67.2
# with a quarter copy, against 66.0 copying only (docs/BENCHMARKS.md section 7)
UNKNOWN_REUSE = 0.25


class _LFUPool(_LRUPool):
    """Evicts the unpinned entry used least often (ties: least recently used)."""

    def __init__(self, slots: list[int], freq: dict[Key, float]):
        super().__init__(slots)
        self.freq = freq  # shared by all pools, kept for evicted keys too

    def victim(self, pinned: set[Key]) -> Key | None:
        best, best_f = None, 0.0
        for key in self.entries:  # least recent first: the first minimum wins ties
            if key in pinned:
                continue
            f = self.freq.get(key, 0.0)
            if best is None or f < best_f:
                best, best_f = key, f
        return best


class FrequencyCache(ExpertCache):
    """Per-key use counts decide the victim: an expert that is used often stays even when it
    was not used recently. Real Mixtral routing is skewed per layer (FACTS.md section 5:
    the busiest expert of a layer takes up to a third of its choices), so frequency beats
    recency when a layer holds 4-5 of its 8 experts (docs/BENCHMARKS.md section 4). In one pool
    for all layers ("shared-lfu") it also beats recency outright: a decode step visits the
    layers in a cycle, and below 2 slots per layer LRU evicts every expert before its next use,
    where counts keep the busiest experts of all layers (section 31).

    `prior` seeds the counts, e.g. from the file's calibration counts (moe-pack calibrate),
    so the first tokens already keep the popular experts."""

    policy = "lfu"

    def __init__(self, pools: dict[int | None, list[int]], prior: dict[Key, float] | None = None):
        self.freq: dict[Key, float] = dict(prior or {})
        super().__init__(pools)
        self._pools = {k: _LFUPool(v, self.freq) for k, v in pools.items()}

    def lookup(self, key: Key) -> int | None:
        self.freq[key] = self.freq.get(key, 0.0) + 1.0  # every use counts, hit or miss
        return super().lookup(key)

    def reuse_value(self, key: Key) -> float:
        """Admission by frequency: caching `key` evicts the pool's least used entry, so it is
        worth what the key is used more often than that victim, as a share of the key's own
        uses (0 when the key is the colder one: copying it would push out a warmer expert, and
        the CPU should take it). With a free slot, a whole copy."""
        pool = self._pool(key[0])
        if pool.free:
            return 1.0
        victim = pool.victim(self.pinned)
        if victim is None:
            return 0.0  # nothing can leave: the copy would not be cached either
        fk, fv = self.freq.get(key, 0.0), self.freq.get(victim, 0.0)
        return max(0.0, (fk - fv) / fk) if fk > 0 else 0.0


def calibration_prior(expert_counts, weight: float = 16.0) -> dict[Key, float] | None:
    """Counts for FrequencyCache from a header's expert_counts: each layer's shares scaled to
    `weight` uses, so observed uses overtake the calibration after a few dozen tokens."""
    if expert_counts is None:
        return None
    prior = {}
    for layer, row in enumerate(expert_counts):
        total = sum(row) or 1
        for e, c in enumerate(row):
            prior[(layer, e)] = weight * c / total
    return prior


class NoCache(ExpertCache):
    """The 'no cache' baseline: every use is a miss and loads the expert again (into one of
    the layer's slots), like the reference paper's 'no cache, no prefetch' row."""

    policy = "none"

    def lookup(self, key: Key) -> int | None:
        if key in self._where and key not in self.pinned:
            self.discard(key)
        return None

    def touch(self, key: Key) -> bool:
        return False

    def hit_slot(self, key: Key) -> int | None:
        return None  # every use loads again

    def reuse_value(self, key: Key) -> float:
        return 0.0  # nothing is kept for a later use


def make_cache(policy: str, n_slots: int, layers: int, top_k: int, prior: dict[Key, float] | None = None) -> ExpertCache:
    """The cache for `policy` over `n_slots` slots ("none" keeps only top_k per layer; "lfu"
    and "shared-lfu" start from the use counts `prior`)."""
    from .budget import POLICIES, min_expert_slots, split_slots

    if policy in POLICIES and n_slots < min_expert_slots(policy, layers, top_k):
        raise ConfigError(f"{n_slots} expert slots are too few for --cache-policy {policy} over {layers} layers: "
                          f"it needs {min_expert_slots(policy, layers, top_k)}")
    if policy == "layer":
        return ExpertCache.per_layer(split_slots(n_slots, layers))
    if policy == "shared":
        return ExpertCache.shared(n_slots)
    if policy in ("lfu", "shared-lfu"):
        cache = FrequencyCache.per_layer(split_slots(n_slots, layers)) if policy == "lfu" else FrequencyCache.shared(n_slots)
        cache.freq.update(prior or {})
        return cache
    if policy == "none":
        return NoCache.per_layer([top_k] * layers)
    raise ConfigError(f"--cache-policy {policy!r} is not one of {', '.join(POLICIES)}")
