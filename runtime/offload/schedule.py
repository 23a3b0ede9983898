"""The per-layer schedule: which experts hit, which must be loaded into which slot, in what
order to load and compute them, and what to prefetch for the next layers. Pure Python: the
engine executes the schedule on devices, the simulator only counts it.

Order within a layer (decode and prefill alike):
  1. needed experts already cached are hits: pinned, computed first (no wait);
  2. misses are inserted (each evicts the least recently used unpinned entry) and their loads
     issued, ordered by need; when the layer needs more experts than its pool can take at
     once, the rest follow in waves: each computed expert is unpinned, and its slot (or an
     older one) takes the next load, so copies keep overlapping computes;
  3. prefetch loads for layers L+1.. are issued right after this layer's own loads (copies
     are FIFO on one stream, so they never delay this layer), never evicting a pinned entry.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Iterable, NamedTuple, Sequence

from .cache import ExpertCache, Key


# named tuples, not frozen dataclasses: a decode step builds a few per layer, and a frozen
# dataclass costs several times as much to construct (the engine's host time is the GPU's
# idle time at every layer: tools/offload_host.py)
class Load(NamedTuple):
    key: Key
    slot: int
    evicted: Key | None
    prefetch: bool


class Compute(NamedTuple):
    key: Key
    slot: int
    hit: bool


@dataclass
class CacheStats:
    uses: int = 0  # expert uses: distinct experts a layer needed, summed over layer calls
    hits: int = 0
    misses: int = 0
    loads: int = 0  # all loads (misses + prefetches)
    prefetched: int = 0  # speculative loads issued
    prefetch_used: int = 0  # of those, needed by their layer while still cached
    prefetch_wasted: int = 0  # of those, evicted before their layer ran or not needed by it
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.uses if self.uses else 0.0

    @property
    def prefetch_precision(self) -> float:
        return self.prefetch_used / self.prefetched if self.prefetched else 0.0

    @property
    def prefetch_recall(self) -> float:
        return self.prefetch_used / self.uses if self.uses else 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(hit_rate=self.hit_rate, prefetch_precision=self.prefetch_precision, prefetch_recall=self.prefetch_recall)
        return d


class Planner:
    """Turns one layer's routing decision into an ordered list of Load / Compute operations,
    updating the cache and the statistics as it goes."""

    def __init__(self, cache: ExpertCache, prefetch: int):
        if prefetch < 0:
            raise ValueError("prefetch must be >= 0")
        self.cache, self.prefetch = cache, prefetch
        self.stats = CacheStats()
        self._outstanding: set[Key] = set()  # prefetched, their layer has not run yet

    def reset_stats(self) -> None:
        self.stats = CacheStats()

    def _evicted(self, key: Key | None) -> None:
        if key is None:
            return
        self.stats.evictions += 1
        if key in self._outstanding:
            self._outstanding.discard(key)
            self.stats.prefetch_wasted += 1

    def plan(self, layer: int, needed: Sequence[int], guesses: Sequence[tuple[int, Sequence[int]]] = ()) -> list[Load | Compute]:
        """needed: distinct experts of `layer`, most needed first; guesses: (target layer,
        experts ranked best first) for the layers to prefetch, nearest first."""
        cache, st = self.cache, self.stats
        keys = [(layer, e) for e in needed]
        hits, queue = [], deque()
        slot_of = {}  # each needed key's slot: as lookup found it, or as insert gave it
        for k in keys:
            slot = cache.lookup(k)
            if slot is not None:
                hits.append(k)
                slot_of[k] = slot
                cache.pin(k)
            else:
                queue.append(k)
        st.uses += len(keys)
        st.hits += len(hits)
        st.misses += len(queue)
        if self._outstanding:
            for k in hits:
                if k in self._outstanding:
                    st.prefetch_used += 1
            # what was prefetched for this layer and not needed is settled now
            stale = {k for k in self._outstanding if k[0] == layer}
            st.prefetch_wasted += len(stale - set(hits))
            self._outstanding -= stale

        ops: list[Load | Compute] = []
        computes = deque(hits)

        def load_more() -> None:
            while queue:
                got = cache.insert(queue[0])
                if got is None:
                    return
                k = queue.popleft()
                slot, evicted = got
                self._evicted(evicted)
                cache.pin(k)
                st.loads += 1
                ops.append(Load(k, slot, evicted, False))
                slot_of[k] = slot
                computes.append(k)

        if queue:
            load_more()
        prefetched = False
        if not queue:
            self._prefetch(layer, guesses, ops)
            prefetched = True
        while computes:
            k = computes.popleft()
            # a pinned entry keeps its slot until unpinned: the slot found (or filled) above
            ops.append(Compute(k, slot_of[k], k in hits))
            cache.unpin(k)
            if queue:
                load_more()
        if queue:  # a pool of zero slots; make_cache never builds one
            raise RuntimeError(f"layer {layer}: no slot can take expert {queue[0][1]}")
        if not prefetched:
            self._prefetch(layer, guesses, ops)
        cache.unpin_all()
        return ops

    def _prefetch(self, layer: int, guesses: Sequence[tuple[int, Sequence[int]]], ops: list) -> None:
        cache, st = self.cache, self.stats
        for target, ranked in guesses:
            if target == layer:
                continue
            for e in list(ranked)[: self.prefetch]:
                k = (target, e)
                if k in cache:
                    # a guessed expert already cached must survive this round of loads
                    cache.touch(k)
                    cache.pin(k)
                    continue
                got = cache.insert(k)
                if got is None:
                    break
                slot, evicted = got
                self._evicted(evicted)
                cache.pin(k)
                st.loads += 1
                st.prefetched += 1
                self._outstanding.add(k)
                ops.append(Load(k, slot, evicted, True))


def simulate(planner: Planner, steps: Iterable[tuple[int, Sequence[int], Sequence[tuple[int, Sequence[int]]]]]) -> CacheStats:
    """Run a routing trace through a planner without any device: (layer, needed, guesses) per step."""
    for layer, needed, guesses in steps:
        planner.plan(layer, needed, guesses)
    return planner.stats
