"""One CPU decode step at a short and a long context, by the C step (runtime.cpu_step) and by the
torch step it replaces: what attention over a long KV cache adds to each.

    python tools/cpu_step_context.py [--layers 2] [--context 1024] [--recipe 4/2m4] [--runs 6]

Builds a synthetic file with Mixtral-8x7B layer shapes (runtime.baseline_bench's), prefills
`--context` random tokens (so every cache position up to there is written), then times single
steps at position 20 and at position context + 6, best of `--runs`, each way. The C step reads
each kv head's cache rows once for its query heads; torch's SDPA gets the grouped query heads
stacked the same way (runtime/attention.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.baseline_bench import bench_config, bench_recipe  # noqa: E402
from runtime.cpu_expert import _native  # noqa: E402
from runtime.cpu_step import CpuStep  # noqa: E402
from runtime.loader import load_model  # noqa: E402
from runtime.offload.synthfile import write_bench_file  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--recipe", default="4/2m4")
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (the tests)")
    args = ap.parse_args(argv)
    if _native() is None:
        print("no compiled CPU kernel here: nothing to compare", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ctx.moepack"
        write_bench_file(path, bench_config(args.layers, args.tiny), bench_recipe(args.recipe), seed=0, progress=False)
        model, file = load_model(path, torch.device("cpu"), torch.float32, ctx=args.context + 8)
        gen = torch.Generator().manual_seed(0)
        model(torch.randint(0, file.config.vocab_size, (args.context,), generator=gen), 0)
        step, token = CpuStep(model, _native()), torch.tensor([5])

        def torch_step(pos: int):
            model.use_torch_step()
            model(token, pos)

        def best_ms(fn, pos: int) -> float:
            times = []
            for _ in range(args.runs):
                t = time.perf_counter()
                fn(pos)
                times.append(time.perf_counter() - t)
            return round(1e3 * min(times), 3)

        row = {"layers": args.layers, "recipe": args.recipe, "threads": torch.get_num_threads(),
               "short_pos": 20, "long_pos": args.context + 6}
        for name, fn in (("c_step", lambda pos: step.step(token, pos)), ("torch_step", torch_step)):
            short, long = best_ms(fn, 20), best_ms(fn, args.context + 6)
            row[name] = {"short_ms": short, "long_ms": long, "added_ms": round(long - short, 3)}
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
