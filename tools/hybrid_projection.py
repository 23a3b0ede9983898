"""Projected decode tok/s of copy-or-compute offloading (issue #7) from measured per-expert
costs, on routing traces calibrated to Mixtral-8x7B (runtime/offload/traces.py). A model, not
a measurement: it says which CPU expert time a GPU budget needs, before any GPU time is spent.

    python tools/hybrid_projection.py                         # 8, 12, 16 GiB; CPU expert 0.8-4 ms
    python tools/hybrid_projection.py --cpu-ms 1.2 --json out.json

Per decode step and layer (real routing: a layer's experts are known only once the layer
before it has run, so nothing of layer L+1 starts before layer L ends):

    t_layer = g + max(link, cpu)

g is the layer's GPU and host time besides missed experts (attention, router, sync, the hit
experts' GEMVs); t_copy = record bytes / pinned host->GPU bandwidth. Three ways to handle the
misses, each column with its own cache trajectory:
- whole: runtime.offload.hybrid.CostModel with experts kept whole (copied, or computed on the
  CPU and not cached);
- w13: the engine's rule until 2026-11-23, which may also split an expert: w1/w3 on the CPU
  while w2 alone (a third of the record) is copied;
- rows: the engine's rule now: a split expert's w1/w3 rows shared so that the link and the
  CPU finish together (runtime.offload.split; CostModel.gpu_rows, up to MAX_ROW_SHARE of them
  on the GPU, not rounded to the engine's 64-row steps), and the copy-or-split choice made
  knowing it;
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
from runtime.offload.hybrid import CostModel  # noqa: E402
from runtime.offload.schedule import Planner  # noqa: E402
from runtime.offload.split import MAX_ROW_SHARE  # noqa: E402
from runtime.offload.traces import SyntheticRouting, reference_params  # noqa: E402

BUDGETS_GIB = (8, 12, 16)
LLAMA_CPP = {"12GiB": 46.7}  # FACTS.md section 2b: -ngl 99 --n-cpu-moe 9, 11.8 GiB


def geometry(expert_meta_bits: int) -> tuple[int, dict[str, int]]:
    """(bytes of one 2-bit g16 Mixtral-8x7B expert, {budget: expert slots}) from the format's
    layout and the runtime's memory plan (fused kernels, 4096-token context, 512 MiB reserve)."""
    from runtime.bench import bench_config, bench_recipe
    from runtime.offload.budget import plan_memory
    from runtime.offload.synthfile import synthetic_header

    h = synthetic_header(bench_config(32, False), bench_recipe(2, expert_meta_bits))
    slots = {f"{b}GiB": plan_memory(h, b << 30, context_tokens=4096, dtype_bytes=2, reserve_bytes=512 << 20,
                                    fused=True).n_slots for b in BUDGETS_GIB}
    return h.expert_layout.record_size, slots


def _simulate(slots: int, policy: str, t_copy: float, t_cpu: float | None, g: float, tokens: int, seed: int,
              mode: str, record_bytes: int) -> tuple[float, list[int]]:
    """(seconds, [copied, split, on CPU]) over `tokens` decode steps. mode "whole": the engine's
    rule with experts kept whole; "w13": whole, or w1/w3 on the CPU while w2 is copied; "rows":
    splits share w1/w3's rows in the balanced ratio; "ideal": every miss shared between the two
    sides in the best ratio, and cached."""
    layers, experts = 32, 8
    routing = SyntheticRouting(reference_params(layers, experts), 0.8, seed)  # same seed, same routes
    cache = make_cache(policy, slots, layers, 2)
    planner = Planner(cache, 0)
    cost = CostModel(record_bytes, copy_gbps=record_bytes / t_copy / 1e9, cpu_s=t_cpu or 1e9,
                     max_gpu_rows=MAX_ROW_SHARE if mode == "rows" else 0.0)
    per_miss = t_copy * t_cpu / (t_copy + t_cpu) if t_cpu else t_copy
    total, counts = 0.0, [0, 0, 0]
    for _ in range(tokens):
        for layer in range(layers):
            needed = routing.route(layer, 1)[0]
            misses = [e for e in needed if (layer, e) not in cache]
            n = len(misses)
            if mode == "ideal" or not t_cpu:
                a, b, c = n, 0, 0
            else:  # the engine's rule (OffloadedExperts._cpu_choice): least worth caching leave first
                value = {e: cache.reuse_value((layer, e)) for e in misses}
                misses.sort(key=lambda e: -value[e])
                a, b, c = cost.assign(n, allow_split=mode in ("w13", "rows"), values=[value[e] for e in misses])
            for e in misses[a:]:  # split / CPU ones stay uncached; the engine counts their use
                cache.lookup((layer, e))
            planner.plan(layer, [e for e in needed if e not in misses[a:]])
            for i, v in enumerate((a, b, c)):
                counts[i] += v
            if mode == "ideal":
                total += g + n * per_miss
            else:  # splits at the engine's share of w1/w3 rows on the GPU (0 but in "rows" mode)
                f, r = cost.w2_share, cost.gpu_rows(a, b, c)
                total += g + max(a * t_copy + b * (f + r * (1 - f)) * t_copy,
                                 b * (1 - r) * (1 - f) * (t_cpu or 0.0) + c * (t_cpu or 0.0))
    return total, counts


def project(slots: int, policy: str, t_copy: float, t_cpu: float | None, g: float, tokens: int, seed: int,
            record_bytes: int) -> dict:
    """tok/s of the three modes for one budget, policy and CPU expert time (None: copy only)."""
    row = {"slots": slots, "policy": policy, "cpu_ms": None if t_cpu is None else t_cpu * 1e3}
    for mode in ("whole", "w13", "rows", "ideal") if t_cpu else ("whole",):
        total, (a, b, c) = _simulate(slots, policy, t_copy, t_cpu, g, tokens, seed, mode, record_bytes)
        row[f"{mode}_tok_s"] = tokens / total
        row[f"{mode}_per_token"] = {"copied": a / tokens, "split": b / tokens, "cpu": c / tokens}
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
    print(f"{'budget':>6} {'slots':>5} {'policy':>6} {'cpu ms':>6} {'whole':>6} {'w13':>6} {'rows':>6} {'ideal':>6}  "
          f"{'w13: copied/split/cpu per token':<32} llama.cpp")
    for budget, slots in budget_slots.items():
        for policy in args.policy or ["layer", "lfu"]:
            for t_cpu in cpus:
                r = project(slots, policy, t_copy, t_cpu, args.gpu_layer_ms / 1e3, args.tokens, args.seed, record_bytes)
                r["budget"] = budget
                rows.append(r)
                cpu = "-" if t_cpu is None else f"{t_cpu * 1e3:.1f}"
                w13 = "-" if t_cpu is None else f"{r['w13_tok_s']:.1f}"
                ideal = "-" if t_cpu is None else f"{r['ideal_tok_s']:.1f}"
                rows_s = "-" if t_cpu is None else f"{r['rows_tok_s']:.1f}"
                pt = r.get("w13_per_token", r["whole_per_token"])
                counts = f"{pt['copied']:.1f} / {pt['split']:.1f} / {pt['cpu']:.1f}"
                print(f"{budget:>6} {slots:>5} {policy:>6} {cpu:>6} {r['whole_tok_s']:>6.1f} {w13:>6} {rows_s:>6} {ideal:>6}  "
                      f"{counts:<32} {LLAMA_CPP.get(budget, '')}")
    if args.json:
        args.json.write_text(json.dumps({"record_bytes": record_bytes, "t_copy_ms": t_copy * 1e3,
                                         "gpu_layer_ms": args.gpu_layer_ms, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
