"""OffloadedExperts: the expert backend that runs Mixtral with only part of its experts on the
GPU. Expert records live in the host tier (runtime.offload.host); a fixed set of device
slots holds the cached ones (runtime.offload.cache); each layer's schedule
(runtime.offload.schedule) is executed here with copies on a dedicated stream
(runtime.offload.streams).

Per layer call the host synchronises once: the routing decision (this layer's top-k and the
speculative guesses for the next layers, fetched together in one .tolist()). Everything
else is ordered by events, so the host runs ahead of the GPU and the copy stream works
while the compute stream runs experts.
"""

from __future__ import annotations

import collections
import itertools
import time
from typing import Callable, Iterable, Protocol, Sequence

import torch

from formats.errors import ConfigError
from formats.reader import MoepackFile

from ..cpu_native import set_auto_activations
from ..device import to_device
from ..experts import expert_ffn
from ..graphs import expert_graphs
from .budget import MemoryPlan
from .cache import ExpertCache, Key, calibration_prior, make_cache
from .hybrid import CostModel
from .hybrid_steps import CPU_OBSERVATIONS_KEPT, HybridSteps, Staged
from .host import HostStore, PendingRead
from .schedule import Load, Planner
from .split import SplitScratch, split_rows_enabled
from .streams import NULL_EVENT, CopyEngine



def _summary_ms(seconds: Iterable[float]) -> dict | None:
    """count, min, median, max in milliseconds; None for no values."""
    if not seconds:
        return None
    v = sorted(seconds)
    return {"n": len(v), "min": round(1e3 * v[0], 3), "median": round(1e3 * v[len(v) // 2], 3),
            "max": round(1e3 * v[-1], 3)}


class RoutingOverride(Protocol):
    """Replaces the routers' decisions (benchmark traces); the model's weights are kept."""

    def route(self, layer: int, n_tokens: int) -> list[list[int]]:
        """[T][k] experts of each token at `layer`."""
        ...

    def guess(self, layer: int, target: int, n_tokens: int, n: int) -> list[list[int]]:
        """[T][n] the prefetcher's ranked guesses for `target`, made while at `layer`."""
        ...


def default_prefetch(policy: str, n_slots: int, layers: int, top_k: int, stage_w2: bool = False) -> int:
    """Experts guessed per next layer when --prefetch is not given: top_k, except with no cache,
    with staged w2 (which replaces it), and in caches of at most top_k + 1 slots per layer. There
    a wrong guess evicts one of the few experts that would have been reused: the trace simulation
    (`runtime.bench --simulate`) copies 20-38% more per token with prefetch at 1-3 slots per
    layer (per-layer LRU: 66.1 against 55.2 experts at 1, 60.7 against 44.1 at 2, 49.6 against
    36.4 at 3; a shared pool likewise), and on the H100 8 GiB (3 slots per layer) decoded 15.3
    tok/s with it against 18.2-19.2 without (docs/BENCHMARKS.md sections 8 and 31). The link
    is the bound there, so bytes decide."""
    if policy == "none" or stage_w2 or n_slots < layers * (top_k + 2):
        return 0
    return top_k


class OffloadedExperts(HybridSteps):
    """ExpertBackend over `n_slots` device slots (see runtime.experts.ExpertBackend)."""

    def __init__(
        self,
        file: MoepackFile,
        device: torch.device,
        dtype: torch.dtype,
        *,
        n_slots: int,
        policy: str = "layer",
        prefetch: int | None = None,
        prefetch_layers: int = 1,
        router_weights: Callable[[int], torch.Tensor] | None = None,
        host: HostStore | None = None,
        host_resident: list[Key] | None = None,
        staging: int = 8,
        io_threads: int = 4,
        progress: bool = True,
        cuda_graphs: bool | None = None,
        hybrid: bool = False,
        cpu_threads: int | None = None,
        stage_w2: bool = False,
    ):
        cfg = file.config
        self.file, self.layout = file, file.header.expert_layout
        self.device, self.dtype = torch.device(device), dtype
        self.layers, self.num_experts, self.top_k = cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok
        n_slots = min(n_slots, self.layers * self.num_experts)
        if prefetch is None:  # staged w2 replaces whole-expert prefetch unless both are asked for
            prefetch = default_prefetch(policy, n_slots, self.layers, self.top_k, stage_w2)
        if policy == "none" and prefetch:
            raise ConfigError("--prefetch needs a cache: --cache-policy none loads every expert on every use",
                              hint="use --cache-policy layer or shared, or --prefetch 0")
        if not 0 <= prefetch <= self.num_experts:
            raise ConfigError(f"--prefetch {prefetch} must be in [0, {self.num_experts}] (experts per layer)")
        if prefetch_layers < 1:
            raise ConfigError(f"--prefetch-layers {prefetch_layers} must be at least 1")
        if stage_w2 and not hybrid:
            raise ConfigError("--prefetch-w2 stages w2 for a split expert: it needs --hybrid", hint="add --hybrid")
        if (prefetch or stage_w2) and router_weights is None:
            raise ConfigError("speculative prefetch needs the model's routers", hint="pass router_weights, or --prefetch 0")
        # "lfu" starts from the file's calibration counts when it has them (moe-pack calibrate)
        self.cache: ExpertCache = make_cache(policy, n_slots, self.layers, self.top_k,
                                             prior=calibration_prior(file.header.expert_counts))
        self.policy = policy
        self.prefetch, self.prefetch_layers = prefetch, prefetch_layers
        self.stage_w2 = stage_w2
        # guesses per future layer: the planner's whole-expert prefetch, or the one staged w2
        self._guess_n = prefetch or (self.top_k if stage_w2 else 0)
        # the layers each layer guesses for (made once: the host's time per layer is the GPU's idle time)
        self._target_lists = [[t for t in range(L + 1, L + 1 + prefetch_layers) if t < self.layers]
                              for L in range(self.layers)]
        self._staged: Staged | None = None  # the next layer's likely miss, w2 copied ahead
        self.planner = Planner(self.cache, prefetch)
        self.routing: RoutingOverride | None = None
        self._router_weights = router_weights
        self._routers: dict[int, torch.Tensor] = {}

        self._own_host = host is None  # a host tier passed in is shared: close() leaves it open
        self.host = host or HostStore(file, resident=host_resident, pin=self.device.type == "cuda",
                                      staging=staging, io_threads=io_threads, progress=progress, device=self.device)
        self.copier = CopyEngine(self.device)
        # allocated once; rows are reused by every expert that passes through the cache
        # on a CPU "device" the slots are host pages: zeroing faults them in now, where the first
        # copy into each would otherwise pay its page faults inside a timed step
        alloc = torch.zeros if self.device.type == "cpu" else torch.empty
        self.slots = alloc((self.cache.n_slots, self.layout.record_size), dtype=torch.uint8, device=self.device)
        self._slot_rows = list(self.slots.unbind(0))  # each slot's row, as a view made once
        # decode replays one captured graph per slot (runtime.graphs); None: on CUDA
        self.graphs = expert_graphs(self.slots, self.layout, dtype, cfg.hidden_size, cuda_graphs)
        self._ready = [NULL_EVENT] * self.cache.n_slots  # copy into the slot done
        self._free = [NULL_EVENT] * self.cache.n_slots  # compute that last read the slot done
        self._pending: dict[int, PendingRead] = {}  # slot -> on-demand read whose copy is not issued yet
        self.plan: MemoryPlan | None = None  # set by the options' factory: where the budget went
        # hybrid: a decode step may compute some missed experts on the CPU instead of copying them
        self.cost: CostModel | None = None
        self.cpu_threads = cpu_threads
        self.split: SplitScratch | None = None  # split experts' scratch copies (hybrid)
        self.cpu_calibration: dict | None = None  # which CPU kernel served, and its timed calls
        # the latest CPU expert times in decode, warm-up included (never reset)
        self.cpu_observed: collections.deque[float] = collections.deque(maxlen=CPU_OBSERVATIONS_KEPT)
        # CPU experts beside the GPU's must match its results: int16 unless asked otherwise
        # (the model's steps read this; runtime.cpu_native.set_auto_activations)
        self.exact_cpu_experts = hybrid
        if hybrid:
            set_auto_activations(False)
            # one more set than a token can split: the staged w2 never takes a set this layer reads
            self.split = SplitScratch(self.layout, self.top_k + stage_w2, self.device, dtype, rows=split_rows_enabled(),
                                      graphs=self.graphs is not None and self.graphs.capturing)
            self.cost = CostModel(self.layout.record_size,
                                  w2_share=self.layout.matrix("w2").nbytes / self.layout.record_size,
                                  max_gpu_rows=self.split.max_rows / self.layout.matrix("w1").shape[0])
            self._calibrate_hybrid()
        self.reset_stats()

    # -- ExpertBackend ----------------------------------------------------------------------
    def forward(self, layer: int, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        # x: [T, H], topk_idx / topk_w: [T, k]
        T, k = topk_idx.shape
        if self._pending:
            self._issue_finished_reads()
        routes, guesses = self._decide(layer, x, topk_idx)
        needed, positions = _by_need(routes, k)
        out, early = None, None
        if T == 1:
            slots = [self.cache.hit_slot((layer, e)) for e in needed]
            if None not in slots:
                # every expert cached (most decode layers): the GPU starts on them now, and the
                # cache's bookkeeping (the plan below: the same slots, pinned) runs meanwhile
                early = slots
                for e, slot in zip(needed, slots):
                    out = self._decode_expert(slot, positions[e][0], x, topk_w, out)
        staged = self._take_staged(layer)
        hybrid_step = self.cost is not None and T == 1
        on_split, on_cpu, rows = self._cpu_choice(layer, needed, staged) if hybrid_step else ([], [], 0)
        if staged is not None:
            self.staged_stats["used" if on_split[:1] == [staged.key[1]] else "wasted"] += 1
        sets: list[int] = []
        if on_split or on_cpu:
            needed = [e for e in needed if e not in on_split and e not in on_cpu]
            # the token and its weights go to the host now, before the GPU work is queued
            x_host, w_host = _to_host(x, topk_w)
            # the CPU starts first (on the kernel's thread, where it runs): it is the layer's critical path
            jobs = self._start_cpu(layer, on_split, on_cpu, rows, x_host)
            sets, copies = self._split_copies(layer, on_split, staged, rows)
        ops = self.planner.plan(layer, needed, guesses if self.prefetch else ())
        self.calls += 1
        self.tokens += T

        if T > 1:
            # token positions (t * k + j) of every needed expert, in one small async upload
            flat_pos = _upload([p for e in needed for p in positions[e]], self.device)
            starts = dict(zip(needed, itertools.accumulate((len(positions[e]) for e in needed), initial=0)))
        reload = _reloaded_after(ops)  # op indices whose slot a later load of this layer overwrites
        deferred = list(early or ())  # slots whose "free" event can wait for the end of the layer
        if early is not None:
            self.expert_tokens += len(early)
        for i, op in enumerate(ops):
            if isinstance(op, Load):
                self._load(op)
                continue
            if early is not None:  # computed above (the plan's computes are exactly those hits)
                continue
            e = op.key[1]
            if T == 1:
                out = self._decode_expert(op.slot, positions[e][0], x, topk_w, out)
            else:
                record = self._record_for(op.slot)
                pos = flat_pos[starts[e]:starts[e] + len(positions[e])]
                tok = torch.div(pos, k, rounding_mode="floor")
                # one matrix of prompt scratch at a time: what the memory plan counts
                y = expert_ffn(record, self.layout, x.index_select(0, tok), self.dtype, prompt_pair=False)  # [n, H]
                w = topk_w.reshape(-1).index_select(0, pos).unsqueeze(1)  # [n, 1]
                out = torch.zeros_like(x) if out is None else out
                out.index_add_(0, tok, y * w)
            if i in reload:  # a wave: the next load into this slot must wait for this compute
                self._free[op.slot] = self.copier.mark_used()
            else:
                deferred.append(op.slot)
            self.expert_tokens += len(positions[e])
        if deferred:  # one event for the layer's other slots (each event costs host time)
            ev = self.copier.mark_used()
            for slot in deferred:
                self._free[slot] = ev
        if hybrid_step and self.stage_w2:  # queued behind this layer's copies, before the CPU's work
            self._stage_next(layer, guesses, sets)
        if on_split:  # the GPU works through its queue meanwhile; w2 h joins it as each h is ready
            y = self._split_compute(layer, on_split, copies, rows, positions, x, jobs, topk_w, sets)
            out = y if out is None else out + y
        if on_cpu:
            y = self._cpu_compute(layer, on_cpu, positions, jobs[len(on_split):], w_host)
            y = to_device(y, self.device, x.dtype)
            out = y if out is None else out + y
        return out if out is not None else torch.zeros_like(x)

    def stats(self) -> dict:
        d = {"backend": "offload", "policy": self.policy, "slots": self.cache.n_slots,
             "prefetch": self.prefetch, "prefetch_layers": self.prefetch_layers,
             "layer_calls": self.calls, "tokens": self.tokens, "expert_tokens": self.expert_tokens,
             "read_wait_s": self.read_wait_s, "cuda_graphs": self.graphs is not None and self.graphs.capturing,
             "hybrid": self.cost is not None, "cpu_experts": self.cpu_experts, "cpu_expert_s": self.cpu_expert_s,
             "split_experts": self.split_experts, "split_cpu_s": self.split_cpu_s,
             "split_gpu_row_share": self.split_gpu_rows / max(1, self.split_experts * self.layout.matrix("w1").shape[0]),
             "cpu_s_per_expert": None if self.cost is None else self.cost.cpu_s,
             "copy_s_per_expert": None if self.cost is None else self.cost.copy_s,
             "cpu_calibration": self.cpu_calibration,
             "cpu_jobs_on_thread": self.cpu_jobs_on_thread, "cpu_observed_ms": _summary_ms(self.cpu_observed),
             "staged_w2": dict(self.staged_stats) if self.stage_w2 else None}
        d.update(self.planner.stats.to_json())
        d.update(self.copier.stats())
        d.update(self.host.stats())
        return d

    def reset_stats(self) -> None:
        self.planner.reset_stats()
        self.copier.reset_stats()
        self.host.reset_stats()
        self.calls = self.tokens = self.expert_tokens = 0
        self.read_wait_s = 0.0
        self.cpu_experts = self.split_experts = self.split_gpu_rows = self.cpu_jobs_on_thread = 0
        self.cpu_expert_s = self.split_cpu_s = 0.0
        # staged w2 copies: issued; used by a split of their expert; wasted (a hit, or not needed,
        # or the expert copied or computed whole)
        self.staged_stats = {"issued": 0, "used": 0, "wasted": 0}

    def close(self) -> None:
        """Finish in-flight work; give back staging buffers, and the host tier if this backend made it."""
        for slot in list(self._pending):
            self.host.release(self._pending.pop(slot))
        self.copier.synchronize()
        if self._own_host:
            self.host.close()

    # -- routing --------------------------------------------------------------------------
    def _targets(self, layer: int) -> list[int]:
        if not self._guess_n:
            return []
        return self._target_lists[layer]

    def _router(self, layer: int, dtype: torch.dtype) -> torch.Tensor:
        w = self._routers.get(layer)
        if w is None or w.dtype != dtype:
            w = self._routers[layer] = self._router_weights(layer).to(device=self.device, dtype=dtype)
        return w

    def _decide(self, layer: int, x: torch.Tensor, topk_idx: torch.Tensor) -> tuple[list[list[int]], list]:
        """(this layer's routes [T][k], [(target, ranked guesses)]) with one host sync."""
        T, k = topk_idx.shape
        targets = self._targets(layer)
        if self.routing is not None:
            # Read the model's own choice anyway, then discard it: a real router's decision
            # exists only once the previous layer has run, and that sync is what keeps copies
            # from starting early. Without it the host ran ahead through the whole token and
            # queued every layer's copies at once, an oracle prefetch no real run has (the
            # trace figures measured before 2026-11-23 include that advantage).
            topk_idx.reshape(-1).tolist()
            routes = self.routing.route(layer, T)
            guesses = [(t, _rank(self.routing.guess(layer, t, T, self._guess_n))) for t in targets]
            return routes, guesses
        parts = [topk_idx.reshape(-1)]
        for t in targets:
            # the paper's speculative guess: layer t's router applied to layer `layer`'s input
            logits = torch.nn.functional.linear(x, self._router(t, x.dtype))  # [T, E]
            parts.append(torch.topk(logits, self._guess_n, dim=-1).indices.reshape(-1))
        flat = torch.cat(parts).tolist() if len(parts) > 1 else parts[0].tolist()  # the one sync
        routes = [flat[t * k:(t + 1) * k] for t in range(T)]
        guesses, at, n = [], T * k, self._guess_n
        for t in targets:
            rows = [flat[at + i * n: at + (i + 1) * n] for i in range(T)]
            guesses.append((t, _rank(rows)))
            at += T * n
        return routes, guesses

    # -- loads ----------------------------------------------------------------------------
    def _load(self, op: Load) -> None:
        slot = op.slot
        old = self._pending.pop(slot, None)
        if old is not None:  # a streamed expert evicted before its copy was issued: drop it
            self.host.release(old)
        src = self.host.view(op.key)
        if src is not None:
            self._ready[slot] = self.copier.copy(self._slot_rows[slot], src, after=self._free[slot])
            return
        while not self.host.has_free_staging():
            self._issue_oldest_read()
        self._pending[slot] = self.host.read_async(op.key)

    def _issue_read(self, slot: int) -> None:
        pending = self._pending.pop(slot)
        t = time.perf_counter()
        buf = self.host.staged(pending)
        self.read_wait_s += time.perf_counter() - t
        ev = self.copier.copy(self._slot_rows[slot], buf, after=self._free[slot])
        self._ready[slot] = ev
        self.host.release(pending, after=ev)

    def _issue_oldest_read(self) -> None:
        self._issue_read(next(iter(self._pending)))

    def _issue_finished_reads(self) -> None:
        for slot in [s for s, p in self._pending.items() if p.future.done()]:
            self._issue_read(slot)

    def _record_for(self, slot: int) -> torch.Tensor:
        """The slot's record, once the compute stream is ordered after the copy into it."""
        if slot in self._pending:
            self._issue_read(slot)
        self.copier.wait(self._ready[slot])
        return self._slot_rows[slot]

    def _decode_expert(self, slot: int, j: int, x: torch.Tensor, topk_w: torch.Tensor,
                       out: torch.Tensor | None) -> torch.Tensor:
        """out + w_j * expert(x) for one token's j-th choice, cached in `slot`: [1, H]."""
        record = self._record_for(slot)
        if self.graphs is not None:
            if out is None:
                self.graphs.set_input(x)
            y = self.graphs.run(slot).to(x.dtype)  # [1, H]
        else:
            y = expert_ffn(record, self.layout, x, self.dtype)  # [1, H]
        w = topk_w[:, j:j + 1]  # [1, 1]
        return y * w if out is None else out.addcmul_(y, w)  # one launch per expert after the first


def _to_host(x: torch.Tensor, topk_w: torch.Tensor, one_copy: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [1, H], topk_w [1, k]) as float32 on the host. From a GPU (one_copy: by default
    x.is_cuda) in one copy of x's dtype (topk_w's too), widened on the host: each copy waits
    for the device, and this is the split layer's way to the CPU's start (two casts and two
    copies cost two launches and a sync more). On the host the casts are no-ops for float32."""
    if not (x.is_cuda if one_copy is None else one_copy):
        return x.float(), topk_w.float()
    H = x.shape[1]
    xw = torch.cat((x.reshape(-1), topk_w.reshape(-1))).cpu().float()  # [H + k]
    return xw[:H].view(1, H), xw[H:].view(1, -1)


def _reloaded_after(ops: list) -> set[int]:
    """Indices of the Compute ops whose slot a later Load of the same plan fills again (waves,
    when a layer needs more experts than it has free slots)."""
    later: set[int] = set()
    out = set()
    for i in range(len(ops) - 1, -1, -1):
        op = ops[i]
        if isinstance(op, Load):
            later.add(op.slot)
        elif op.slot in later:
            out.add(i)
    return out


def _by_need(routes: list[list[int]], k: int) -> tuple[list[int], dict[int, list[int]]]:
    """Distinct experts, most tokens first (ties: first seen), and each one's flat positions t*k+j."""
    if len(routes) == 1 and len(set(routes[0])) == len(routes[0]):  # a decode step: each once, in order
        return [int(e) for e in routes[0]], {int(e): [j] for j, e in enumerate(routes[0])}
    positions: dict[int, list[int]] = {}
    for t, row in enumerate(routes):
        for j, e in enumerate(row):
            positions.setdefault(int(e), []).append(t * k + j)
    order = sorted(positions, key=lambda e: -len(positions[e]))  # stable: keeps first-seen order on ties
    return order, positions


def _rank(rows: Sequence[Sequence[int]]) -> list[int]:
    """Guesses of all tokens ranked by how many tokens guessed them (then by rank in a row)."""
    if len(rows) == 1:
        return [int(e) for e in rows[0]]
    score: dict[int, tuple[int, int]] = {}
    for row in rows:
        for r, e in enumerate(row):
            c, best = score.get(int(e), (0, r))
            score[int(e)] = (c + 1, min(best, r))
    return sorted(score, key=lambda e: (-score[e][0], score[e][1], e))


def _upload(values: list[int], device: torch.device) -> torch.Tensor:
    """A small int64 tensor on `device` without a blocking copy (runtime.device.to_device)."""
    return to_device(torch.tensor(values, dtype=torch.int64), device)
