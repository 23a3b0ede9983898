"""Projected decode tok/s of copy-or-compute offloading (issue #7) from measured per-expert
costs, on routing traces calibrated to Mixtral-8x7B (runtime/offload/traces.py). A model, not
a measurement: it says which CPU expert time a GPU budget needs, before any GPU time is spent.

    python tools/hybrid_projection.py                         # 8, 12, 16 GiB; CPU expert 0.8-4 ms
    python tools/hybrid_projection.py --cpu-ms 1.2 --json out.json

Per decode step and layer (real routing: a layer's experts are known only once the layer
before it has run, so nothing of layer L+1 starts before layer L ends):

    t_layer = g + max(link, cpu)

g is the layer's GPU and host time besides missed experts (attention, router, sync, the hit
experts' GEMVs); t_copy = record bytes / pinned host->GPU bandwidth. Ways to handle the
misses, each column with its own cache trajectory (the same routes in each):
- whole: runtime.offload.hybrid.CostModel with experts kept whole (copied, or computed on the
  CPU and not cached);
- w13: the engine's rule until 2026-11-23, which may also split an expert: w1/w3 on the CPU
  while w2 alone (a third of the record) is copied;
- rows: the engine's rule now: a split expert's w1/w3 rows shared so that the link and the
  CPU finish together (runtime.offload.split; CostModel.gpu_rows, up to MAX_ROW_SHARE of them
  on the GPU, not rounded to the engine's 64-row steps), and the copy-or-split choice made
  knowing it;
- w2: "rows", and with each layer's misses queued, the w2 of the next layer's best guessed
  miss (the trace's guesses, right with probability 0.8 per expert) is copied into a spare
  scratch set (--prefetch-w2); a split of that expert then costs the link only its GPU rows.
  The staging copy runs in the link's slack (the layer's CPU side past the link's, then the
  next layer's g); the rest of it delays the next layer's copies;
- ideal: every miss shared between the two sides in the best ratio, n * t_copy * t_cpu /
  (t_copy + t_cpu) per layer, and every miss cached (not built). Not a strict bound: at small
  budgets caching every miss can evict popular experts that the w13 rule leaves in place. Default g = 0.53 ms:
the H100 host's 16 GiB model-routing LRU run of 2026-11-22 (55.6 tok/s at 0.76 copies per
token, docs/BENCHMARKS.md section 4).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.offload.cache import make_cache  # noqa: E402
from runtime.offload.hybrid import CostModel, choose  # noqa: E402
from runtime.offload.schedule import Planner  # noqa: E402
from runtime.offload.split import MAX_ROW_SHARE  # noqa: E402
from runtime.offload.traces import SyntheticRouting, reference_params  # noqa: E402

BUDGETS_GIB = (8, 12, 16)
LLAMA_CPP = {"12GiB": 46.7}  # FACTS.md section 2b: -ngl 99 --n-cpu-moe 9, 11.8 GiB


def geometry(expert_meta_bits: int) -> tuple[int, dict[str, int]]:
    """(bytes of one 2-bit g16 Mixtral-8x7B expert, {budget: expert slots}) from the format's
    layout and the runtime's memory plan on CUDA (fused kernels, the embedding table in host RAM,
    4096-token context, 512 MiB reserve)."""
    from runtime.bench import bench_config, bench_recipe
    from runtime.offload.budget import plan_memory
    from runtime.offload.synthfile import synthetic_header

    h = synthetic_header(bench_config(32, False), bench_recipe(2, expert_meta_bits))
    slots = {f"{b}GiB": plan_memory(h, b << 30, context_tokens=4096, dtype_bytes=2, reserve_bytes=512 << 20,
                                    fused=True, embed_on_host=True).n_slots for b in BUDGETS_GIB}
    return h.expert_layout.record_size, slots


def _simulate(slots: int, policy: str, t_copy: float, t_cpu: float | None, g: float, tokens: int, seed: int,
              mode: str, record_bytes: int) -> tuple[float, list[int]]:
    """(seconds, [copied, split, on CPU, staged splits]) over `tokens` decode steps. mode
    "whole": the engine's rule with experts kept whole; "w13": whole, or w1/w3 on the CPU while
    w2 is copied; "rows": splits share w1/w3's rows in the balanced ratio; "w2": "rows", and
    each layer stages the w2 of the next layer's best guessed miss (--prefetch-w2); "ideal":
    every miss shared between the two sides in the best ratio, and cached.

    The staged copy is queued behind a layer's own copies. The link is free for it while the
    CPU side of the layer is longer than the link's, and during the next layer's g (its
    dense part runs before its router decides); what does not fit there delays the next
    layer's copies."""
    layers, experts = 32, 8
    routing = SyntheticRouting(reference_params(layers, experts), 0.8, seed)  # same seed, same routes
    # the staged w2's spare scratch set (w2 and half of w1/w3's rows: 2/3 of a record) costs a slot
    cache = make_cache(policy, slots - (mode == "w2"), layers, 2)
    planner = Planner(cache, 0)
    cost = CostModel(record_bytes, copy_gbps=record_bytes / t_copy / 1e9, cpu_s=t_cpu or 1e9,
                     max_gpu_rows=MAX_ROW_SHARE if mode in ("rows", "w2") else 0.0)
    f = cost.w2_share
    per_miss = t_copy * t_cpu / (t_copy + t_cpu) if t_cpu else t_copy
    total, counts = 0.0, [0, 0, 0, 0]
    staged, spill = None, 0.0  # the expert whose w2 is staged for this layer; the staging's overrun
    for _ in range(tokens):
        for layer in range(layers):
            needed = routing.route(layer, 1)[0]
            # guesses have their own generator: drawing them leaves the routes as the other modes see them
            guesses = routing.guess(layer, layer + 1, 1, 2)[0] if mode == "w2" and layer + 1 < layers else []
            misses = [e for e in needed if (layer, e) not in cache]
            n, r = len(misses), 0.0
            if mode == "ideal" or not t_cpu:
                copied, split, on_cpu = misses, [], []
            else:  # the engine's rule (OffloadedExperts._cpu_choice): least worth caching leave first
                value = {e: cache.reuse_value((layer, e)) for e in misses}
                misses.sort(key=lambda e: -value[e])
                copied, split, on_cpu, r = choose(cost, misses, [value[e] for e in misses], spill, staged,
                                                  allow_split=mode in ("w13", "rows", "w2"))
            for e in split + on_cpu:  # split / CPU ones stay uncached; the engine counts their use
                cache.lookup((layer, e))
            planner.plan(layer, [e for e in needed if e not in split and e not in on_cpu])
            st = int(staged in split)  # the staged w2 was used
            for i, v in enumerate((len(copied), len(split), len(on_cpu), st)):
                counts[i] += v
            if mode == "ideal":
                total += g + n * per_miss
                continue
            # splits at the engine's share of w1/w3 rows on the GPU (0 but in "rows" and "w2")
            A, B, C = len(copied), len(split), len(on_cpu)
            link = spill + A * t_copy + ((B - st) * f + B * r * (1 - f)) * t_copy
            busy = max(link, B * (1 - r) * (1 - f) * (t_cpu or 0.0) + C * (t_cpu or 0.0))
            total += g + busy
            staged, spill = None, 0.0
            if mode == "w2":
                staged = next((e for e in guesses if (layer + 1, e) not in cache), None)
                # the engine stages only what the costs would split if it missed alone
                if staged is not None and cost.assign_staged(0, cache.reuse_value((layer + 1, staged)))[0] != "split":
                    staged = None
                if staged is not None:
                    spill = max(0.0, f * t_copy - (busy - link) - g)
    return total, counts


def project(slots: int, policy: str, t_copy: float, t_cpu: float | None, g: float, tokens: int, seed: int,
            record_bytes: int) -> dict:
    """tok/s of the three modes for one budget, policy and CPU expert time (None: copy only)."""
    row = {"slots": slots, "policy": policy, "cpu_ms": None if t_cpu is None else t_cpu * 1e3}
    for mode in ("whole", "w13", "rows", "w2", "ideal") if t_cpu else ("whole",):
        total, (a, b, c, s) = _simulate(slots, policy, t_copy, t_cpu, g, tokens, seed, mode, record_bytes)
        row[f"{mode}_tok_s"] = tokens / total
        row[f"{mode}_per_token"] = {"copied": a / tokens, "split": b / tokens, "cpu": c / tokens,
                                    "staged_splits": s / tokens}
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-ms", type=float, action="append", help="CPU expert times to project (ms); repeatable")
    ap.add_argument("--copy-gbps", type=float, default=54.3, help="pinned host->GPU bandwidth (H100 host: 54.3)")
    ap.add_argument("--gpu-layer-ms", type=float, default=0.53, help="g: per-layer time besides missed experts")
    ap.add_argument("--policy", action="append", choices=["layer", "lfu"], help="cache policies (default both)")
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--expert-meta-bits", type=int, choices=[8, 4], default=8,
                    help="the experts' scale/zero codes: 4 is 16%% fewer bytes per expert (format version 2)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    record_bytes, budget_slots = geometry(args.expert_meta_bits)
    t_copy = record_bytes / (args.copy_gbps * 1e9)
    cpus = [None] + [c / 1e3 for c in (args.cpu_ms or [4.0, 2.0, 1.2, 0.8])]
    rows = []
    print(f"expert {record_bytes:,} bytes, t_copy {t_copy * 1e3:.2f} ms, g {args.gpu_layer_ms} ms per layer, "
          f"{args.tokens} tokens of calibrated trace")
    print(f"{'budget':>6} {'slots':>5} {'policy':>6} {'cpu ms':>6} {'whole':>6} {'w13':>6} {'rows':>6} {'w2':>6} "
          f"{'ideal':>6}  {'w2: copied/split/cpu/staged per token':<38} llama.cpp")
    for budget, slots in budget_slots.items():
        for policy in args.policy or ["layer", "lfu"]:
            for t_cpu in cpus:
                r = project(slots, policy, t_copy, t_cpu, args.gpu_layer_ms / 1e3, args.tokens, args.seed, record_bytes)
                r["budget"] = budget
                rows.append(r)
                cpu = "-" if t_cpu is None else f"{t_cpu * 1e3:.1f}"
                cols = ["-" if t_cpu is None else f"{r[m + '_tok_s']:.1f}" for m in ("w13", "rows", "w2", "ideal")]
                pt = r.get("w2_per_token", r["whole_per_token"])
                counts = f"{pt['copied']:.1f} / {pt['split']:.1f} / {pt['cpu']:.1f} / {pt['staged_splits']:.2f}"
                print(f"{budget:>6} {slots:>5} {policy:>6} {cpu:>6} {r['whole_tok_s']:>6.1f} "
                      + " ".join(f"{c:>6}" for c in cols) + f"  {counts:<38} {LLAMA_CPP.get(budget, '')}")
    if args.json:
        args.json.write_text(json.dumps({"record_bytes": record_bytes, "t_copy_ms": t_copy * 1e3,
                                         "gpu_layer_ms": args.gpu_layer_ms, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
