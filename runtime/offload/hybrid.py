"""Copy, compute, or both: what happens to each of a decode step's missed experts (issue #7).

A missed expert can be
- copied to the GPU (record bytes over the PCIe link, then a GPU GEMV; it stays cached);
- computed where it already is, in host RAM, by runtime.cpu_expert (the token's hidden state
  goes down, ~8 KB, and the result comes back);
- split: the CPU computes h = silu(w1 x) * w3 x (two thirds of the work) while the link copies
  only w2 (the record's last third, one contiguous range) into a scratch buffer, then the GPU
  computes w2 h. Both halves run at once, so a miss costs max(2/3 t_cpu, 1/3 t_copy) instead
  of min(t_cpu, t_copy).
A layer's experts are known only after the layer before it ran, so each layer pays for its own
misses and most layers have 0 or 1: for a single miss only the split uses both resources.
tools/hybrid_projection.py projects, at 12 GiB with LFU and a 1.2 ms CPU expert, 36 tok/s for
whole-expert copy-or-compute and 46 with the split (docs/BENCHMARKS.md section 7).

For n misses the model picks (copied a, split b, on the CPU c), a + b + c = n, minimising

    max(copy_backlog + a t_copy + b f t_copy,  b (1 - f) t_cpu + c t_cpu)  +  (b + c) reuse_weight t_copy

with f = w2's share of the record, t_copy = record bytes / measured copy bandwidth and t_cpu
the measured time of one CPU expert (running averages, so the choice follows the machine and
its load). The last term is what an uncached expert costs later: the next token that needs it
misses again. Without it a CPU a little faster than a copy took every single miss and the
cache stopped learning (16 GiB, LFU, t_cpu 1.2 ms against t_copy 1.24 ms: 55.7 tok/s projected
against 66.0 copying only, 67.2 with reuse_weight 0.25).
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
    reuse_weight: float = 0.25  # future cost of an uncached (CPU-computed) expert, in copies
    w2_share: float = 1 / 3  # f: w2's share of the record's bytes and of an expert's arithmetic

    @property
    def copy_s(self) -> float:
        return self.record_bytes / (self.copy_gbps * 1e9)

    def cost(self, copied: int, split: int, on_cpu: int, copy_backlog_s: float = 0.0) -> float:
        """The objective above for one assignment (seconds)."""
        f = self.w2_share
        link = copy_backlog_s + copied * self.copy_s + split * f * self.copy_s
        cpu = split * (1 - f) * self.cpu_s + on_cpu * self.cpu_s
        return max(link, cpu) + (split + on_cpu) * self.reuse_weight * self.copy_s

    def assign(self, n_misses: int, copy_backlog_s: float = 0.0, allow_split: bool = True) -> tuple[int, int, int]:
        """(copied, split, on_cpu) for `n_misses`. Ties prefer copies, then splits: a copied
        expert stays cached, and a split keeps the CPU's share of the work smallest."""
        best, best_t = (n_misses, 0, 0), None
        for a in range(n_misses, -1, -1):
            for b in range(n_misses - a + 1 if allow_split else 1):
                c = n_misses - a - b
                t = self.cost(a, b, c, copy_backlog_s)
                if best_t is None or t < best_t - 1e-12:
                    best, best_t = (a, b, c), t
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
