"""Where a resident decode step's time goes: kernels (by name) against Python/launch overhead.

    python tools/profile_decode.py [--layers 2] [--recipe 4/2] [--steps 8] [--cuda-graphs step]
    python tools/profile_decode.py --prefill 512     # one 512-token prompt instead

Builds a synthetic Mixtral-8x7B-shape file (runtime.offload.synthfile), loads it with every
expert resident, runs greedy decode steps under torch.profiler and prints the GPU time per
kernel name, the GPU busy time per step and the wall time per step. Wall minus GPU busy is
what CUDA graphs and fewer launches can win.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from formats.errors import MoepackError  # noqa: E402
from runtime.baseline_bench import GRAPH_MODES, bench_config, bench_recipe  # noqa: E402
from runtime.experts import resident_experts  # noqa: E402
from runtime.device import resolve_device, resolve_dtype, synchronize  # noqa: E402
from runtime.loader import load_model  # noqa: E402
from runtime.offload.synthfile import write_bench_file  # noqa: E402


def _recipe(name: str) -> str:
    try:
        bench_recipe(name)
    except MoepackError as e:
        raise argparse.ArgumentTypeError(e.message.removeprefix("--recipe ")) from None
    return name


def parse_args(argv, description: str, steps: int) -> argparse.Namespace:
    """The options both decode-profiling tools take (tools/cpu_overhead.py imports this)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--recipe", default="4/2", type=_recipe)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--prefill", type=int, default=0, metavar="N",
                   help="profile one N-token prompt (prefill) instead of decode steps")
    p.add_argument("--cuda-graphs", default="on", choices=sorted(GRAPH_MODES),
                   help="off, layers (a graph per layer and expert), step (one graph per step, experts chosen on "
                        "the device) or on (the best the backend offers); see runtime.baseline_bench")
    return p.parse_args(argv)


def resident_model(args: argparse.Namespace, ctx: int):
    """(model, file, device): a synthetic file of args' shape and recipe, every expert resident."""
    dev = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_bench_file(Path(tmp) / "p.moepack", bench_config(args.layers, args.tiny),
                                bench_recipe(args.recipe), progress=False)
        graphs, routing = GRAPH_MODES[getattr(args, "cuda_graphs", "on")]
        model, file = load_model(path, dev, resolve_dtype("auto", dev), ctx=ctx, cuda_graphs=graphs and None,
                                 expert_backend_factory=functools.partial(resident_experts, cuda_graphs=graphs and None,
                                                                          device_routing=routing))
    return model, file, dev


def main(argv=None) -> int:
    args = parse_args(argv, __doc__, 8)
    model, _, dev = resident_model(args, 64 + args.steps + args.prefill)
    if args.prefill:
        return profile_prefill(model, dev, args)
    token = model(torch.arange(16, device=dev), 0, last_only=True)[-1].argmax()
    pos = 16
    for _ in range(4):
        token = model(token.view(1), pos, last_only=True)[-1].argmax()
        pos += 1
    synchronize(dev)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            token = model(token.view(1), pos, last_only=True)[-1].argmax()
            pos += 1
        synchronize(dev)
        wall = time.perf_counter() - t0  # all steps (report divides)
    report(prof, dev, args, wall, args.steps, f"{args.cuda_graphs} graphs")
    return 0


def profile_prefill(model, dev, args) -> int:
    """One args.prefill-token prompt (after a warm-up one) under the profiler."""
    prompt = torch.randint(0, model.config.vocab_size, (args.prefill,), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(dev)
    model(prompt, 0, last_only=True)
    synchronize(dev)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        model(prompt, 0, last_only=True)
        synchronize(dev)
        wall = time.perf_counter() - t0
    print(f"prefill of {args.prefill} tokens: {args.prefill / wall:.1f} tok/s")
    report(prof, dev, args, wall, 1, f"{args.prefill}-token prompt")
    return 0


def report(prof, dev, args, wall: float, steps: int, what: str) -> None:
    """GPU time per kernel name per step, against the wall time per step."""
    gpu: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            gpu.setdefault(e.name, []).append(e.device_time)  # us
    busy = sum(sum(v) for v in gpu.values()) / steps
    launches = sum(len(v) for v in gpu.values()) / steps
    print(f"{args.recipe}, {args.layers} layers, {dev}, {what}: wall {wall / steps * 1e3:.3f} ms/step, "
          f"GPU busy {busy / 1e3:.3f} ms/step, {launches:.0f} kernels/step ({launches / args.layers:.0f} per layer)")
    print(f"{'kernel':<70}{'calls/step':>11}{'us/call':>9}{'us/step':>9}")
    for name, v in sorted(gpu.items(), key=lambda kv: -sum(kv[1]))[:25]:
        print(f"{name[:69]:<70}{len(v) / steps:>11.1f}{sum(v) / len(v):>9.1f}{sum(v) / steps:>9.1f}")
    if dev.type != "cuda":
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))


if __name__ == "__main__":
    sys.exit(main())
