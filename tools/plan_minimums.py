"""The smallest GPU budget per cache policy for Mixtral-8x7B shapes (2-bit experts, 8- or 4-bit
meta), as runtime.generate plans it on CUDA: fused kernels, the embedding table in host RAM,
512 MiB of CUDA reserve, a 4096-token context; then the slots some budgets buy. Last, what
pools of fewer slots than layers hit (only shared pools run there), on the trace routing of
`runtime.bench --simulate` (32 layers, 200 tokens, no prefetch).

    python tools/plan_minimums.py [--json]
"""

from __future__ import annotations

import json
import sys

from formats.errors import ConfigError
from runtime.bench import bench_config, bench_recipe, simulate_policy
from runtime.offload.budget import GiB, plan_memory
from runtime.offload.options import CUDA_RESERVE
from runtime.offload.synthfile import synthetic_header

BUDGETS_GIB = (3, 4, 5, 6, 6.5, 7, 8, 12, 16)


def rows() -> list[dict]:
    out = []
    for meta in (8, 4):
        h = synthetic_header(bench_config(32, False), bench_recipe(2, meta))
        for policy in ("layer", "shared-lfu", "none"):
            def plan(budget: int):  # as runtime.generate plans it on CUDA
                return plan_memory(h, budget, context_tokens=4096, dtype_bytes=2, reserve_bytes=CUDA_RESERVE, fused=True,
                                   embed_on_host=True, policy=policy)

            slots = {}
            for b in BUDGETS_GIB:
                try:
                    slots[str(b)] = plan(int(b * GiB)).n_slots
                except ConfigError:
                    slots[str(b)] = None
            whole = plan(1 << 40)
            out.append({"expert_meta_bits": meta, "record_size": h.expert_layout.record_size, "policy": policy,
                        "min_slots": whole.min_slots, "fixed_gib": whole.fixed_bytes / GiB,
                        "min_budget_gib": whole.min_budget / GiB, "slots_at_gib": slots})
    return out


def small_pools(sizes=(4, 8, 16), tokens: int = 200) -> list[dict]:
    out = []
    for n in sizes:
        for policy in ("shared", "shared-lfu"):
            st = simulate_policy(policy, n, 32, 8, 0, tokens, 0.8, 0)
            out.append({"slots": n, "policy": policy, "hit_rate": st.hit_rate, "loads_per_token": st.loads / tokens})
    return out


def main(argv: list[str]) -> int:
    data, small = rows(), small_pools()
    if "--json" in argv:
        print(json.dumps({"plans": data, "small_pools": small}, indent=1))
        return 0
    print("| meta | policy | fewest slots | smallest budget | " + " | ".join(f"{b} GiB" for b in BUDGETS_GIB) + " |")
    print("|---|---|---|---|" + "---|" * len(BUDGETS_GIB))
    for r in data:
        cells = ["-" if v is None else str(v) for v in r["slots_at_gib"].values()]
        print(f"| {r['expert_meta_bits']}-bit | {r['policy']} | {r['min_slots']} | {r['min_budget_gib']:.2f} GiB | " + " | ".join(cells) + " |")
    print("\n| slots (32 layers) | policy | hit rate | experts copied per token |\n|---|---|---|---|")
    for r in small:
        print(f"| {r['slots']} | {r['policy']} | {r['hit_rate']:.3f} | {r['loads_per_token']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
