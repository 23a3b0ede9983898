"""Host work of the offloading engine per decode layer call, measured without a GPU.

    python tools/offload_host.py [--variant lru --variant hybrid-w2] [--tokens 200] [--json out.json]

Why: with real routing a layer's experts are known only once its router has run, so at every
layer the host reads the decision (the one sync), and only then plans, issues copies and
launches the experts. The GPU waits for all of that before the layer's first expert: 32
times a token. At issue #7's 60 tok/s a token has 16.7 ms, 0.52 ms a layer.

What is timed: OffloadedExperts.forward for one token at each of 32 layers of a tiny-width
file with Mixtral's routing structure (8 experts, top-2), on the CPU "device", driven by
trace routing (runtime.offload.traces; guesses right with probability 0.8), with the
experts' work stubbed: the GPU's expert FFN returns its input, the CPU expert kernel returns
zeros. The hybrid cost model is frozen at the H100 host's figures (a copy 1.04 ms, a CPU
expert 1.0 ms), so the hybrid variants choose as they would there. What is left is the
engine's Python and torch dispatch. Not in it: on CUDA a copy also creates and records two
timing events and a graph replay costs its launch; here a copy is a memcpy of a small record.
The trace's own drawing (route, guess) is timed apart and left out of "engine".

Printed per variant: the engine's microseconds per layer call, and its parts (each method
timed by a wrapper, which adds ~0.3 us per call to the parts, not to "engine"). Then what
the GPU waits for: from the routing decision's arrival (the end of _decide, whose sync is
where a real run's GPU falls idle) to the engine's first expert launch (a hit's FFN or a
split's GPU rows), to its first copy, and to the start of the CPU's work (hybrid), mean over
the layer calls that have one. The host work after those launches overlaps the GPU's, the
link's and the CPU's work.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.bench import bench_file  # noqa: E402
from runtime.offload.engine import OffloadedExperts  # noqa: E402
from runtime.offload.host import HostStore  # noqa: E402
from runtime.offload.traces import SyntheticRouting, reference_params  # noqa: E402

LAYERS, EXPERTS = 32, 8
VARIANTS = {  # OffloadedExperts keywords, as runtime.bench builds them
    "lru": dict(prefetch=0),
    "prefetch": dict(prefetch=None),
    "hybrid-only": dict(prefetch=0, hybrid=True),
    "hybrid-w2": dict(hybrid=True, stage_w2=True),
}
PARTS = ("_decide", "_cpu_choice", "_split_copies", "_load", "_record_for", "_stage_next", "_split_compute",
         "_cpu_compute", "plan")
COPY_S, CPU_S = 1.04e-3, 1.0e-3  # H100 host: a 2-bit 4-bit-meta expert over 54.3 GB/s; a CPU expert


_FIRST: list = [None]  # the _FirstLaunch of the run in progress, seen by the stubbed FFN


def _stub_expert_work():
    """The experts' arithmetic as no-ops (returns a restore function)."""
    import runtime.cpu_expert as cpu
    import runtime.offload.engine as engine

    saved = [(engine, "expert_ffn", engine.expert_ffn), (cpu, "start_expert", cpu.start_expert)]

    def ffn(record, layout, x, dtype, **kw):
        if _FIRST[0] is not None:
            _FIRST[0].mark("expert")
        return x
    engine.expert_ffn = ffn

    inline = os.environ.get(cpu.JOBS_ENV, "1") == "0"

    def start_expert(record, layout, x, threads=None, first_row=0, whole=False):
        # the CPU's work starts here on the compiled kernel's thread, or inline where the engine
        # asks for the result (MOEPACK_CPU_WORKER=0: the engine's order before that thread)
        def work():
            if _FIRST[0] is not None:
                _FIRST[0].mark("cpu")
            return torch.zeros_like(x) if whole else torch.zeros(x.shape[0], layout.matrix("w1").shape[0] - first_row)
        if inline:
            return cpu.ExpertJob(None, work, whole)
        out = work()
        return cpu.ExpertJob(None, lambda: out, whole)
    cpu.start_expert = start_expert

    def restore():
        for mod, name, fn in saved:
            setattr(mod, name, fn)
    return restore


class _Timer:
    """Wraps methods of objects and sums their wall time."""

    def __init__(self):
        self.seconds: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()

    def wrap(self, obj, name: str, label: str | None = None) -> None:
        fn, label = getattr(obj, name), label or name

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t
                self.calls[label] += 1
        setattr(obj, name, timed)


class _FirstLaunch:
    """Per layer call: seconds from the end of _decide to the first expert launch, to the first
    copy and to the start of the CPU's work, and whether the layer missed (a copy, a split or
    a CPU expert of its own)."""

    def __init__(self, be):
        self.be, self.t0 = be, None
        self.calls: list[dict] = []
        decide = be._decide

        def decided(*args, **kwargs):
            out = decide(*args, **kwargs)
            self.close_call()
            self.t0, self.misses0 = time.perf_counter(), self._misses()
            self.calls.append({"expert": None, "copy": None, "cpu": None})
            return out
        be._decide = decided
        if be.split is not None:
            self.wrap(be.split, "gpu_hidden", "expert")
        self.wrap(be.copier, "copy", "copy")

    def _misses(self) -> int:
        return self.be.planner.stats.misses + self.be.split_experts + self.be.cpu_experts

    def close_call(self) -> None:
        if self.t0 is not None:
            self.calls[-1]["missed"] = self._misses() > self.misses0

    def wrap(self, obj, name: str, kind: str) -> None:
        fn = getattr(obj, name)

        def first(*args, **kwargs):
            self.mark(kind)
            return fn(*args, **kwargs)
        setattr(obj, name, first)

    def mark(self, kind: str) -> None:
        if self.t0 is not None and self.calls[-1][kind] is None:
            self.calls[-1][kind] = time.perf_counter() - self.t0

    def summary(self) -> dict:
        self.close_call()

        def mean(kind: str, missed: bool) -> float | None:
            v = [c[kind] for c in self.calls if c[kind] is not None and c["missed"] == missed]
            return round(1e6 * statistics.fmean(v), 2) if v else None
        return {"to_first_expert_us": {"all_hit": mean("expert", False), "missed": mean("expert", True)},
                "to_first_copy_us": {"missed": mean("copy", True)}, "to_cpu_start_us": mean("cpu", True)}


def measure(variant: str, tokens: int, slots: int, repeats: int, seed: int, cache_dir: Path) -> dict:
    file = bench_file(cache_dir, LAYERS, True, 2, seed, expert_meta_bits=4)
    cfg = file.config
    restore = _stub_expert_work()
    host = HostStore(file, pin=False, progress=False)
    try:
        router = torch.zeros(EXPERTS, cfg.hidden_size)
        be = OffloadedExperts(file, torch.device("cpu"), torch.float32, n_slots=slots, router_weights=lambda L: router,
                              host=host, progress=False, **VARIANTS[variant])
        if be.cost is not None:  # frozen at the H100 host's figures
            be.cost.copy_gbps = file.header.expert_layout.record_size / COPY_S / 1e9
            be.cost.cpu_s, be.cost.smoothing = CPU_S, 0.0
        be.routing = SyntheticRouting(reference_params(LAYERS, EXPERTS), 0.8, seed=seed)
        x = torch.randn(1, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
        idx, w = torch.tensor([[0, 1]]), torch.tensor([[0.6, 0.4]])

        def run(n: int) -> float:
            t0 = time.perf_counter()
            with torch.inference_mode():
                for _ in range(n):
                    for layer in range(LAYERS):
                        be.forward(layer, x, idx, w)
            return time.perf_counter() - t0

        run(max(8, tokens // 4))  # fill the cache
        trace = _Timer()  # the trace's drawing is not the engine's work
        trace.wrap(be.routing, "route", "trace")
        trace.wrap(be.routing, "guess", "trace")
        totals = []
        for _ in range(repeats):
            trace.seconds.clear()
            be.reset_stats()
            totals.append((run(tokens) - trace.seconds["trace"]) / (tokens * LAYERS))
        stats = be.stats()
        parts = _Timer()
        for name in PARTS:
            target = be.planner if name == "plan" else be
            if hasattr(target, name):
                parts.wrap(target, name)
        trace.seconds.clear()
        run(tokens)
        calls = tokens * LAYERS
        split = {k: round(1e6 * v / calls, 2) for k, v in parts.seconds.most_common()}
        split["_decide"] = round(split.get("_decide", 0.0) - 1e6 * trace.seconds["trace"] / calls, 2)  # its trace part out
        for name in PARTS:  # unwrapped: the first-launch timing below sees the engine alone
            target = be.planner if name == "plan" else be
            if name in vars(target):
                delattr(target, name)
        first = _FirstLaunch(be)
        _FIRST[0] = first
        run(tokens)
        _FIRST[0] = None
        be.close()
    finally:
        host.close()
        restore()
    per = stats["layer_calls"] or 1
    return {
        "variant": variant, "slots": slots, "tokens": tokens, "repeats": repeats,
        "engine_us_per_layer": round(1e6 * statistics.median(totals), 2),
        "engine_us_per_layer_all": [round(1e6 * t, 2) for t in totals],
        "engine_ms_per_token": round(1e3 * statistics.median(totals) * LAYERS, 3),
        "parts_us_per_layer": split,
        **first.summary(),
        "hit_rate": round(stats["hit_rate"], 3), "copies_per_layer": round(stats["copies"] / per, 3),
        "split_per_layer": round(stats["split_experts"] / per, 3), "cpu_per_layer": round(stats["cpu_experts"] / per, 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", choices=list(VARIANTS), help="repeatable [default: all]")
    ap.add_argument("--tokens", type=int, default=200, help="decode steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--slots", type=int, default=180, help="expert slots (Mixtral 2-bit, 4-bit meta, 12 GiB: 180)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in args.variant or list(VARIANTS):
            row = measure(v, args.tokens, args.slots, args.repeats, args.seed, Path(tmp))
            rows.append(row)
            parts = ", ".join(f"{k.lstrip('_')} {v:.1f}" for k, v in row["parts_us_per_layer"].items())
            print(f"{v:12s} engine {row['engine_us_per_layer']:6.1f} us/layer ({row['engine_ms_per_token']:.2f} ms/token), "
                  f"hit {row['hit_rate']:.3f}, copies {row['copies_per_layer']:.2f}, split {row['split_per_layer']:.2f}, "
                  f"cpu {row['cpu_per_layer']:.2f} per layer\n             parts (us/layer): {parts}\n"
                  f"             from the decision (us): first expert launch {row['to_first_expert_us']['all_hit']} "
                  f"(layers that hit), {row['to_first_expert_us']['missed']} (missed); "
                  f"first copy {row['to_first_copy_us']['missed']} (missed); CPU start {row['to_cpu_start_us']}")
    if args.json:
        out = {"command": "python tools/offload_host.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "runs": rows}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
