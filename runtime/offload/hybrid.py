"""Copy or compute: which of a decode step's missed experts run on the CPU (issue #7).

A missed expert can be copied to the GPU (record bytes over the PCIe link, then a GPU GEMV)
or computed where it already is, in host RAM, by runtime.cpu_expert (the token's hidden
state goes down, ~8 KB, and the result comes back). The two resources work at the same
time, so for a layer with n misses the split that finishes first is the one that balances
them: c experts on the CPU and n - c copies, minimising

    max(copy_backlog + (n - c) * t_copy,  c * t_cpu)  +  c * reuse_weight * t_copy

with t_copy = record bytes / measured copy bandwidth and t_cpu the measured time of one CPU
expert (both running averages, so the split follows the machine and its load). The last term
is what a CPU-computed expert costs later: it is not cached, so the next token that needs it
misses again. Without it a CPU a little faster than a copy took every single miss and the
cache stopped learning: tools/hybrid_projection.py on the calibrated traces (16 GiB, LFU,
t_cpu 1.2 ms against t_copy 1.24 ms) projects 55.7 tok/s against 66.0 copying only, and
67.2 with reuse_weight 0.25, which keeps the gains where the CPU is much faster.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CostModel:
    record_bytes: int
    copy_gbps: float = 25.0  # until measured: a PCIe 4 x16 link
    cpu_s: float = 0.010  # one CPU expert, until measured
    smoothing: float = 0.2  # weight of a new measurement in the running averages
    reuse_weight: float = 0.25  # future cost of an uncached (CPU-computed) expert, in copies

    @property
    def copy_s(self) -> float:
        return self.record_bytes / (self.copy_gbps * 1e9)

    def split(self, n_misses: int, copy_backlog_s: float = 0.0) -> int:
        """How many of `n_misses` to compute on the CPU (the rest are copied). Ties go to the
        copy side: a copied expert stays cached for later tokens, a CPU-computed one does not."""
        best_c, best_t = 0, None
        for c in range(n_misses + 1):
            t = max(copy_backlog_s + (n_misses - c) * self.copy_s, c * self.cpu_s) + c * self.reuse_weight * self.copy_s
            if best_t is None or t < best_t - 1e-12:
                best_c, best_t = c, t
        return best_c

    def observe_cpu(self, seconds: float) -> None:
        self.cpu_s += self.smoothing * (seconds - self.cpu_s)

    def observe_copy(self, gbps: float) -> None:
        if gbps > 0:
            self.copy_gbps += self.smoothing * (gbps - self.copy_gbps)
