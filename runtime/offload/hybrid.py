"""Copy, compute, or both: what happens to each of a decode step's missed experts (issue #7).

A missed expert can be
- copied to the GPU (record bytes over the PCIe link, then a GPU GEMV; it stays cached);
- computed where it already is, in host RAM, by runtime.cpu_expert (the token's hidden state
  goes down, ~8 KB, and the result comes back);
- split: the CPU computes h = silu(w1 x) * w3 x (two thirds of the work) while the link copies
  only w2 (the record's last third, one contiguous range) into a scratch buffer, then the GPU
  computes w2 h. Both halves run at once, so a miss costs max(2/3 t_cpu, 1/3 t_copy) instead
  of min(t_cpu, t_copy). With max_gpu_rows > 0 the GPU also takes a share r of w1/w3's rows
  (copied with w2, runtime.offload.split), chosen so that both sides finish together
  (gpu_rows): max((1/3 + 2/3 r) t_copy, 2/3 (1 - r) t_cpu).
A layer's experts are known only after the layer before it ran, so each layer pays for its own
misses and most layers have 0 or 1: for a single miss only the split uses both resources.
tools/hybrid_projection.py projects, at 12 GiB with LFU and a 1.2 ms CPU expert, 36 tok/s for
whole-expert copy-or-compute and 46 with the split (docs/BENCHMARKS.md section 7).

For n misses, ordered by what caching each is worth (most first), the model picks (copied a,
split b, on the CPU c), a + b + c = n: the first a are copied, the rest split or computed,
minimising

    max(copy_backlog + a t_copy + b (f + r (1 - f)) t_copy,  b (1 - r) (1 - f) t_cpu + c t_cpu)
        +  t_copy sum(v_i, i >= a)

with f = w2's share of the record, r = gpu_rows(a, b, c) (0 without row splits), t_copy =
record bytes / measured copy bandwidth and t_cpu the measured time of one CPU expert (running averages, so the choice follows the machine and
its load). The last term is what the uncached experts cost later: v_i, in copies, is the
cache's reuse value of miss i (ExpertCache.reuse_value). Without it a CPU a little faster than
a copy took every single miss and the cache stopped learning. With one fixed value for every
miss (a quarter copy, until 2026-11-23) the best charge depended on the budget: a nearly
complete cache wants a whole copy (16 GiB, 4-bit meta, t_cpu 1.0 ms: 74.7 tok/s projected at a
quarter, 127.6 at one), a small one wants little (8 GiB: 39.4 at a quarter, 24.9 at one). The
LFU cache now answers per expert: a whole copy while a slot is free, else how much more often
the expert is used than the entry it would evict, and nothing for one colder than that entry,
whose copy would push a warmer expert out.

A staged miss (--prefetch-w2, offload.engine) had its w2 copied ahead, one layer earlier, into
a spare scratch set: split, it costs the link only its GPU rows (`staged` in gpu_rows and
cost); assign_staged weighs that against copying it whole or computing it on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass


OUTLIER_FACTOR = 4.0  # cap of one CPU observation, as a multiple of the current estimate


@dataclass
class CostModel:
    record_bytes: int
    copy_gbps: float = 25.0  # until measured: a PCIe 4 x16 link
    cpu_s: float = 0.010  # one CPU expert, until measured
    smoothing: float = 0.2  # weight of a new measurement in the running averages
    reuse_weight: float = 0.25  # future cost of an uncached expert, in copies, when the caller gives no values
    w2_share: float = 1 / 3  # f: w2's share of the record's bytes and of an expert's arithmetic
    # the largest share of a split expert's w1/w3 rows the GPU may take (copied, then computed
    # there: see gpu_rows); 0 keeps the fixed cut, w1/w3 on the CPU and w2 on the GPU
    max_gpu_rows: float = 0.0

    @property
    def copy_s(self) -> float:
        return self.record_bytes / (self.copy_gbps * 1e9)

    def gpu_rows(self, copied: int, split: int, on_cpu: int, copy_backlog_s: float = 0.0, staged: int = 0) -> float:
        """The share r of each split expert's w1/w3 rows that the GPU takes (copied with w2 and
        computed there; the CPU computes the other rows' h) so that link and CPU finish
        together, in [0, max_gpu_rows]: from

            link(r) = backlog + a t_copy + (b - s) f t_copy + b r (1 - f) t_copy
            cpu(r)  = b (1 - r) (1 - f) t_cpu + c t_cpu

        s of the b splits are staged: their w2 was copied ahead (a queued copy is in the
        backlog already). With r = 0 this is the fixed cut; a CPU slower than the link's
        share moves rows over. tools/hybrid_projection.py ("rows"): 12 GiB, 4-bit meta,
        g 0.27 ms, t_cpu 1.2 ms: 47.5 tok/s with the fixed cut, 55.8 balanced."""
        return _gpu_rows(*self._terms(copy_backlog_s), copied, split, on_cpu, staged)

    def cost(self, copied: int, split: int, on_cpu: int, copy_backlog_s: float = 0.0,
             uncached_value: float | None = None, staged: int = 0) -> float:
        """The objective above for one assignment (seconds), splits at gpu_rows' share, `staged`
        of them with w2 copied ahead. uncached_value: the summed reuse values of the misses
        left uncached (default: reuse_weight each)."""
        if uncached_value is None:
            uncached_value = (split + on_cpu) * self.reuse_weight
        return _cost(*self._terms(copy_backlog_s), copied, split, on_cpu, uncached_value, staged)

    def _terms(self, copy_backlog_s: float) -> tuple[float, float, float, float, float]:
        """(f, t_copy, t_cpu, max_gpu_rows, backlog): the arguments of _cost and _gpu_rows."""
        return self.w2_share, self.copy_s, self.cpu_s, self.max_gpu_rows, copy_backlog_s

    def assign(self, n_misses: int, copy_backlog_s: float = 0.0, allow_split: bool = True,
               values: list[float] | None = None) -> tuple[int, int, int]:
        """(copied, split, on_cpu) for `n_misses`: the first `copied` misses are copied, the next
        `split` split, the rest computed on the CPU. values: each miss's reuse value in copies,
        in decreasing order (default: reuse_weight each). Ties prefer copies, then splits: a
        copied expert stays cached, and a split keeps the CPU's share of the work smallest."""
        if values is None:
            values = [self.reuse_weight] * n_misses
        tail = [sum(values[a:]) for a in range(n_misses + 1)]  # value left uncached when the first a are copied
        terms = self._terms(copy_backlog_s)
        best, best_t = (n_misses, 0, 0), None
        for a in range(n_misses, -1, -1):
            for b in range(n_misses - a + 1 if allow_split else 1):
                c = n_misses - a - b
                t = _cost(*terms, a, b, c, tail[a], 0)
                if best_t is None or t < best_t - 1e-12:
                    best, best_t = (a, b, c), t
        return best

    def assign_staged(self, n_others: int, staged_value: float, copy_backlog_s: float = 0.0,
                      values: list[float] | None = None) -> tuple[str, tuple[int, int, int]]:
        """Like assign, for a step whose misses include one staged expert (its w2 copied ahead
        into a split scratch set, offload.engine): (what the staged miss becomes, "split",
        "copy" or "cpu"; (copied, split, on_cpu) of the `n_others` other misses, ordered as in
        assign). Split, it costs the link only its GPU rows; copied or computed whole, the
        staged bytes are wasted. Ties prefer the split (the bytes are there), then a copy."""
        if values is None:
            values = [self.reuse_weight] * n_others
        tail = [sum(values[a:]) for a in range(n_others + 1)]
        terms = self._terms(copy_backlog_s)
        best, best_t = None, None
        for role, plus in _STAGED_ROLES:
            for a in range(n_others, -1, -1):
                for b in range(n_others - a + 1):
                    c = n_others - a - b
                    t = _cost(*terms, a + plus[0], b + plus[1], c + plus[2],
                              tail[a] + (0.0 if role == "copy" else staged_value), plus[1])
                    if best_t is None or t < best_t - 1e-12:
                        best, best_t = (role, (a, b, c)), t
        return best

    def split(self, n_misses: int, copy_backlog_s: float = 0.0) -> int:
        """How many of `n_misses` to compute wholly on the CPU when experts are not split (the
        rest are copied)."""
        return self.assign(n_misses, copy_backlog_s, allow_split=False)[2]

    def observe_cpu(self, seconds: float) -> None:
        """A new CPU expert time. One observation moves the estimate at most OUTLIER_FACTOR-fold:
        the CPU is measured only when it is used, so one stalled call (the machine busy, a
        page fault storm) that multiplied the estimate would keep the CPU idle for good; a
        lasting slowdown still gets through, geometrically."""
        seconds = min(seconds, OUTLIER_FACTOR * self.cpu_s)
        self.cpu_s += self.smoothing * (seconds - self.cpu_s)

    def observe_copy(self, gbps: float) -> None:
        if gbps > 0:
            self.copy_gbps += self.smoothing * (gbps - self.copy_gbps)


# what a staged miss may become, and what it adds to (copied, split, on_cpu); ties keep this order
_STAGED_ROLES = (("split", (0, 1, 0)), ("copy", (1, 0, 0)), ("cpu", (0, 0, 1)))


def _gpu_rows(f: float, tc: float, tp: float, max_rows: float, backlog: float,
              copied: int, split: int, on_cpu: int, staged: int) -> float:
    """CostModel.gpu_rows over plain numbers: the assignment loops call it (through _cost) a few
    times per decode layer, on the host time the GPU waits for."""
    if split == 0 or max_rows <= 0:
        return 0.0
    lag = split * (1 - f) * tp + on_cpu * tp - backlog - copied * tc - (split - staged) * f * tc
    return min(max_rows, max(0.0, lag / (split * (1 - f) * (tc + tp))))


def _cost(f: float, tc: float, tp: float, max_rows: float, backlog: float,
          copied: int, split: int, on_cpu: int, uncached_value: float, staged: int) -> float:
    """CostModel.cost over plain numbers (see _gpu_rows)."""
    r = _gpu_rows(f, tc, tp, max_rows, backlog, copied, split, on_cpu, staged) if split else 0.0
    link = backlog + copied * tc + ((split - staged) * f + split * r * (1 - f)) * tc
    cpu = split * (1 - r) * (1 - f) * tp + on_cpu * tp
    return max(link, cpu) + uncached_value * tc


def choose(cost: CostModel, misses: list[int], values: list[float], backlog_s: float = 0.0,
           staged: int | None = None, allow_split: bool = True) -> tuple[list[int], list[int], list[int], float]:
    """(copied, split, on the CPU, the GPU's share of the splits' w1/w3 rows) for a decode
    step's `misses`, most worth caching first (`values`: their reuse values, in copies).
    `staged`: a miss whose w2 was copied ahead (assign_staged); split, it comes first among
    the splits. The engine's rule (OffloadedExperts._cpu_choice) and the projection's
    (tools/hybrid_projection.py)."""
    if staged is None or staged not in misses:
        a, b, c = cost.assign(len(misses), backlog_s, allow_split, values)
        return misses[:a], misses[a:a + b], misses[a + b:], cost.gpu_rows(a, b, c, backlog_s)
    i = misses.index(staged)
    others, rest = misses[:i] + misses[i + 1:], values[:i] + values[i + 1:]
    role, (a, b, c) = cost.assign_staged(len(others), values[i], backlog_s, rest)
    copied, split, on_cpu = others[:a], others[a:a + b], others[a + b:]
    if role == "split":
        split = [staged] + split
    elif role == "cpu":
        on_cpu = on_cpu + [staged]
    else:
        copied = copied + [staged]
    return copied, split, on_cpu, cost.gpu_rows(len(copied), len(split), len(on_cpu), backlog_s, staged=int(role == "split"))
