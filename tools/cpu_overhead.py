"""Where the host (Python) time of a resident decode step goes: cProfile of a few steps,
plus per-call host times of the fused kernels' wrappers in the same process.

    python tools/cpu_overhead.py [--layers 2] [--recipe 4/2]
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from profile_decode import parse_args, resident_model  # noqa: E402
from runtime.device import synchronize  # noqa: E402
from runtime.kernels import fused_expert_ffn  # noqa: E402


def per_call_us(fn, n: int, dev) -> float:
    fn()
    synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    synchronize(dev)
    return 1e6 * (time.perf_counter() - t0) / n


def main(argv=None) -> int:
    args = parse_args(argv, __doc__, 5)
    model, file, dev = resident_model(args, 64 + 2 * args.steps)
    token = model(torch.arange(16, device=dev), 0, last_only=True)[-1].argmax()
    pos = 16

    def step():
        nonlocal token, pos
        token = model(token.view(1), pos, last_only=True)[-1].argmax()
        pos += 1

    for _ in range(3):
        step()
    synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(dev)
    print(f"decode step: {1e3 * (time.perf_counter() - t0) / args.steps:.2f} ms ({args.layers} layers, {args.recipe})")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        step()
    synchronize(dev)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue()[:6000])
    x = torch.randn(1, model.config.hidden_size, device=dev, dtype=model.dtype)
    rec = model.experts.records[0]
    layout = file.header.expert_layout
    if dev.type == "cuda":  # the fused kernels need a GPU
        print(f"fused_expert_ffn eager, T=1: {per_call_us(lambda: fused_expert_ffn(rec, layout, x), 50, dev):.1f} us/call")
    q = getattr(getattr(model.layers[0], "attn", None), "q_proj", None)
    if q is not None:
        print(f"attention q projection eager: {per_call_us(lambda: q(x), 50, dev):.1f} us/call")
    print(f"torch.add eager: {per_call_us(lambda: x.add(1.0), 200, dev):.1f} us/call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
