"""The hybrid steps of OffloadedExperts (--hybrid, runtime.offload.hybrid): which of a decode
step's missed experts the CPU computes or shares with the GPU, the shared (split) experts'
and the CPU's work, the staged w2 of the next layer's likely split (--prefetch-w2), and the
CPU's measured costs. A mixin: the engine's state (cache, host tier, copier, split scratch,
cost model, statistics) is set up by OffloadedExperts.__init__.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from ..device import to_device
from .cache import Key
from .hybrid import choose

CPU_CALIBRATION_CALLS = 5  # timed CPU expert calls at start-up (hybrid); the median is kept
CPU_OBSERVATIONS_KEPT = 256  # the latest CPU expert times kept for the statistics


class Staged(NamedTuple):
    """A guessed miss of the next layer whose w2 was copied ahead into split scratch set `set`;
    `event` marks the copy's end."""

    key: Key
    set: int
    event: object


class HybridSteps:
    """OffloadedExperts' copy-or-compute methods (see the module docstring)."""

    def _calibrate_hybrid(self) -> None:
        """Measure one copy and one CPU expert, so the first split is already informed. The CPU
        figure is the median of several calls on a random token: the first decision rests on
        it, and an expert computed on the CPU is the only later measurement, so one slow
        outlier here (a busy core, a thread pool starting) would keep the CPU idle for the
        whole run. Zeros would flatter the kernel (it skips words of zero activations)."""
        from ..cpu_expert import cpu_kernel_name, start_expert

        key = next(((L, e) for L in range(self.layers) for e in range(self.num_experts)
                    if self.host.is_resident((L, e))), None)
        if key is None:
            return
        src = self.host.view(key)
        if self.device.type == "cuda":
            self.slots[0].copy_(src, non_blocking=True)  # warm-up
            torch.cuda.synchronize(self.device)
            t = time.perf_counter()
            self.slots[0].copy_(src, non_blocking=True)
            torch.cuda.synchronize(self.device)
            self.cost.copy_gbps = src.numel() / max(time.perf_counter() - t, 1e-9) / 1e9
        x = torch.randn(1, self.file.config.hidden_size, generator=torch.Generator().manual_seed(0))
        # where decode runs it (the kernel's own thread and its thread team, where it serves)
        for _ in range(2):  # loads or compiles the kernel, starts its threads
            start_expert(src, self.layout, x, self.cpu_threads, whole=True).result()
        jobs = [start_expert(src, self.layout, x, self.cpu_threads, whole=True) for _ in range(CPU_CALIBRATION_CALLS)]
        samples = [j.result()[1] for j in jobs]  # queued at once: each one's time is its own run
        self.cost.cpu_s = sorted(samples)[len(samples) // 2]
        self.cpu_calibration = {"kernel": cpu_kernel_name(), "threads": self.cpu_threads,
                                "on_thread": jobs[0].on_thread, "samples_ms": [round(1e3 * v, 3) for v in samples]}

    def _cpu_choice(self, layer: int, needed: list[int], staged: Staged | None = None) -> tuple[list[int], list[int], int]:
        """(split, on the CPU, rows): the missed experts of this decode step whose w1/w3 the CPU
        computes, but for the first `rows` rows, which the GPU computes while w2 is copied, and
        those it computes whole (see offload.hybrid). The misses least worth caching leave the
        copy path first (ties: the least needed). A staged miss (its w2 copied ahead) that is
        split comes first in the split list."""
        misses = [e for e in needed if (layer, e) not in self.cache and self.host.is_resident((layer, e))]
        if not misses:
            return [], [], 0
        # the link's queue (prefetches for this and later layers) delays a copy issued now; the CPU
        # takes more misses the busier the link is
        backlog = self.copier.pending_bytes() / (self.cost.copy_gbps * 1e9)
        value = {e: self.cache.reuse_value((layer, e)) for e in misses}
        misses.sort(key=lambda e: -value[e])  # stable: ties keep the order of need
        _, split, on_cpu, share = choose(self.cost, misses, [value[e] for e in misses], backlog,
                                         None if staged is None else staged.key[1])
        return split, on_cpu, self.split.rows_for(share) if split else 0

    def _take_staged(self, layer: int) -> Staged | None:
        """The staged w2 meant for this layer, if any; one meant for another layer is dropped
        (the layer it guessed ran without a decode step, e.g. a prompt)."""
        staged, self._staged = self._staged, None
        if staged is not None and staged.key[0] != layer:
            self.staged_stats["wasted"] += 1
            return None
        return staged

    def _stage_next(self, layer: int, guesses: list, busy_sets: list[int]) -> None:
        """Copy the w2 of the next layer's best-ranked guess that is neither cached nor short of
        a host record into a split scratch set this layer does not read: if that expert misses
        and is split, its link share is only the GPU's rows of w1/w3. Queued behind this
        layer's copies, it runs while the GPU and CPU compute this layer."""
        ranked = next((r for t, r in guesses if t == layer + 1), ())
        e = next((e for e in ranked if (layer + 1, e) not in self.cache and self.host.is_resident((layer + 1, e))), None)
        # only where the costs would split it if it missed alone: a CPU too slow to take
        # splits would leave every staged byte unused and the link that much later
        if e is None or self.cost.assign_staged(0, self.cache.reuse_value((layer + 1, e)))[0] != "split":
            return
        i = next(i for i in range(len(self.split.w2)) if i not in busy_sets)
        event = self.split.stage_w2(self.copier, self.host.view((layer + 1, e)), i)
        self._staged = Staged((layer + 1, e), i, event)
        self.staged_stats["issued"] += 1

    def _split_copies(self, layer: int, experts: list[int], staged: Staged | None, rows: int) -> tuple[list[int], list]:
        """The link's first job: each split expert's scratch set, and its copies there (w2 unless
        staged, the first `rows` rows of w1/w3): (sets, [(w2's event, the rows' event)])."""
        sets = _split_sets(experts, staged, len(self.split.w2))
        copies = [self.split.copy(self.copier, self.host.view((layer, e)), i, rows,
                                  staged.event if staged is not None and i == staged.set else None)
                  for i, e in zip(sets, experts)]
        return sets, copies

    def _start_cpu(self, layer: int, on_split: list[int], on_cpu: list[int], rows: int,
                   x_host: torch.Tensor) -> list:
        """The CPU's jobs of this step, one per expert in order (split, then whole): a split's
        h rows `rows`.. ([1, I - rows] float32), a whole expert's y ([1, H]). Where the compiled
        kernel serves, they run on its own thread while this one issues the GPU's and the
        link's work (cpu_expert.start_expert)."""
        from ..cpu_expert import start_expert

        jobs = [start_expert(self.host.view((layer, e)), self.layout, x_host, self.cpu_threads, first_row=rows)
                for e in on_split]
        jobs += [start_expert(self.host.view((layer, e)), self.layout, x_host, self.cpu_threads, whole=True)
                 for e in on_cpu]
        self.cpu_jobs_on_thread += sum(j.on_thread for j in jobs)
        return jobs

    def _split_compute(self, layer: int, experts: list[int], copies: list, rows: int,
                       positions: dict[int, list[int]], x: torch.Tensor, jobs: list, topk_w: torch.Tensor,
                       sets: list[int]) -> torch.Tensor:
        """sum_j w_j * w2_j h_j over `experts`: h_j = silu(w1 x) * w3 x, its first `rows` rows
        on the device from scratch copies (queued first, so the GPU works while the CPU does)
        and the others from the CPU's jobs (_start_cpu), then w2_j h_j on the device from the
        scratch copy of w2 (offload.split): [1, H] on the device."""
        gpu_h = [self.split.gpu_hidden(self.copier, i, rows, x, done) for i, (_, done) in zip(sets, copies)] if rows else []
        out, dt = None, 0.0
        for i, e in enumerate(experts):
            self.cache.lookup((layer, e))  # a use the cache sees (a miss: frequency policies count it)
            h, seconds = jobs[i].result()  # [1, I - rows]
            dt += seconds  # the CPU's part only: waiting for the copy is the link's
            h = to_device(h, self.device, topk_w.dtype)  # the host goes on queueing meanwhile
            if rows:
                h = torch.cat([gpu_h[i].to(h.dtype), h], dim=1)  # [1, I]
            j = positions[e][0]
            y = self.split.w2_apply(self.copier, sets[i], h, copies[i][0]) * topk_w[:, j:j + 1]  # [1, H]
            out = y if out is None else out + y
        cpu_share = (1 - self.cost.w2_share) * (1 - rows / self.layout.matrix("w1").shape[0])
        self._observe_cpu(dt / len(experts) / cpu_share)  # as a whole expert's time
        self.split_experts += len(experts)
        self.split_gpu_rows += rows * len(experts)
        self.split_cpu_s += dt
        self._count_uncached(len(experts))
        return out

    def _cpu_compute(self, layer: int, experts: list[int], positions: dict[int, list[int]],
                     jobs: list, w_host: torch.Tensor) -> torch.Tensor:
        """sum_j w_j * expert_j(x) over `experts`, from the CPU's jobs (_start_cpu): [1, H] float32."""
        out, dt = None, 0.0
        for e, job in zip(experts, jobs):
            self.cache.lookup((layer, e))  # a use the cache sees (a miss: frequency policies count it)
            y, seconds = job.result()  # [1, H]
            dt += seconds
            y = y * w_host[:, positions[e][0]:positions[e][0] + 1]
            out = y if out is None else out + y
        self._observe_cpu(dt / len(experts))
        self.cpu_experts += len(experts)
        self.cpu_expert_s += dt
        self._count_uncached(len(experts))
        return out

    def _observe_cpu(self, seconds: float) -> None:
        """Feed one CPU expert time to the cost model, and keep it for the statistics: the
        model's running figure alone cannot tell a steady 3 ms from one stalled call."""
        self.cost.observe_cpu(seconds)
        self.cpu_observed.append(seconds)

    def _count_uncached(self, n: int) -> None:
        """Uses and misses of experts the planner never saw (split or computed on the CPU)."""
        self.planner.stats.uses += n
        self.planner.stats.misses += n
        self.expert_tokens += n


def _split_sets(on_split: list[int], staged: Staged | None, n_sets: int) -> list[int]:
    """The scratch set of each split expert: a staged one keeps the set its w2 went to, the
    others take the lowest other sets in order."""
    rest = (i for i in range(n_sets) if staged is None or i != staged.set)
    return [staged.set if staged is not None and e == staged.key[1] else next(rest) for e in on_split]
