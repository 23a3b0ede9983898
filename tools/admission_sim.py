"""Would frequency caches copy less if a cold miss did not evict a warmer expert? A measured
answer to the question section 31 left open (docs/BENCHMARKS.md section 32).

LFU (per layer, or one shared pool) must put every missed expert in a slot, so a rarely used
expert that misses pushes out the pool's least used entry even when that entry is used more
often than the newcomer. Admission in the TinyLFU manner keeps it: the newcomer is copied into
one of B bypass slots, computed, and dropped. Bypass slots come out of the same budget. Each
row is loads per token on `runtime.bench --simulate`'s trace routing (real Mixtral's per-layer
popularity and token-to-token reuse; 32 layers, top-2, no prefetch, which the engine turns off
at these sizes), averaged over seeds.

    python tools/admission_sim.py [--tokens 400] [--seeds 3] [--json]
"""

from __future__ import annotations

import json
import sys

import click

from runtime.offload.budget import split_slots
from runtime.offload.cache import FrequencyCache, Key
from runtime.offload.schedule import Planner, simulate
from runtime.offload.traces import SyntheticRouting, reference_params, trace_steps


class BypassLFU(FrequencyCache):
    """FrequencyCache with admission: a miss used no more often than its pool's victim goes to
    a bypass slot and leaves the cache when unpinned (after its compute)."""

    def __init__(self, pools: dict[int | None, list[int]], bypass_slots: list[int]):
        super().__init__(pools)
        self.bypass_free = list(reversed(bypass_slots))
        self.n_bypass = len(bypass_slots)
        self.transient: dict[Key, int] = {}
        self.bypassed = 0

    @property
    def n_slots(self) -> int:
        return super().n_slots + self.n_bypass

    def __contains__(self, key: Key) -> bool:
        return key in self.transient or super().__contains__(key)

    def slot_of(self, key: Key) -> int | None:
        return self.transient.get(key, super().slot_of(key))

    def insert(self, key: Key):
        pool = self._pool(key[0])
        if not pool.free:
            victim = pool.victim(self.pinned)
            if victim is None or self.freq.get(key, 0.0) <= self.freq.get(victim, 0.0):
                if not self.bypass_free:
                    return None  # the planner waits for a computed bypass entry (a wave)
                self.transient[key] = slot = self.bypass_free.pop()
                self.bypassed += 1
                return slot, None
        return super().insert(key)

    def pin(self, key: Key) -> None:
        if key in self.transient:
            self.pinned.add(key)
        else:
            super().pin(key)

    def unpin(self, key: Key) -> None:
        self.pinned.discard(key)
        slot = self.transient.pop(key, None)
        if slot is not None:
            self.bypass_free.append(slot)

    def unpin_all(self) -> None:
        for key in list(self.transient):
            self.unpin(key)
        super().unpin_all()


def loads_per_token(shared: bool, n_slots: int, bypass: int, layers: int, tokens: int, seed: int) -> tuple[float, int]:
    main = n_slots - bypass
    if shared:
        pools = {None: list(range(main))}
    else:
        pools, start = {}, 0
        for layer, n in enumerate(split_slots(main, layers)):
            pools[layer] = list(range(start, start + n))
            start += n
    cache = BypassLFU(pools, list(range(main, n_slots))) if bypass else FrequencyCache(pools)
    routing = SyntheticRouting(reference_params(layers, 8), 0.8, seed)
    st = simulate(Planner(cache, 0), trace_steps(routing, tokens, 0))
    return st.loads / tokens, getattr(cache, "bypassed", 0)


@click.command(help=__doc__)
@click.option("--tokens", type=click.IntRange(1), default=400, show_default=True)
@click.option("--seeds", type=click.IntRange(1), default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def main(tokens: int, seeds: int, as_json: bool) -> None:
    layers, rows = 32, []
    for shared in (False, True):
        for per_layer in (1, 2, 3, 4, 5):
            n_slots = per_layer * layers
            for bypass in (0, 1, 2, 4, 8):
                if not shared and n_slots - bypass < layers:
                    continue  # per-layer pools need a slot each
                runs = [loads_per_token(shared, n_slots, bypass, layers, tokens, s) for s in range(seeds)]
                rows.append({"policy": "shared-lfu" if shared else "lfu", "slots": n_slots, "bypass": bypass,
                             "loads_per_token": sum(r[0] for r in runs) / seeds,
                             "bypassed_per_token": sum(r[1] for r in runs) / seeds / tokens})
    if as_json:
        json.dump(rows, sys.stdout, indent=1)
        print()
        return
    print("| policy | slots | bypass slots | loads/token | of them bypassed |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['slots']} | {r['bypass']} | {r['loads_per_token']:.1f} | {r['bypassed_per_token']:.1f} |")


if __name__ == "__main__":
    main()
