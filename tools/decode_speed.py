"""Decode speed of a .moepack file's model on this machine, without sampling, tokenizer or CLI
around it: a 29-token prompt, 5 warm-up steps, then the best of 3 runs of 30 greedy steps.

    python tools/decode_speed.py /tmp/demo/smollm2-4-4.moepack [--device cpu]

For A/B runs of two checkouts: run it from each one's folder in turn (the checkout's `runtime`
is imported from the current directory), interleaved, so both see the same machine load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())  # the checkout being measured, not necessarily this file's

from runtime.device import resolve_device, resolve_dtype  # noqa: E402
from runtime.loader import load_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    dev = resolve_device(args.device)
    model, _ = load_model(args.model, dev, resolve_dtype("auto", dev), ctx=256)
    model(torch.arange(1, 30, device=dev), 0)
    token, pos = torch.tensor([9], device=dev), 29
    for _ in range(5):
        token = model(token, pos, last_only=True)[-1].argmax().view(1)
        pos += 1
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(30):
            token = model(token, pos, last_only=True)[-1].argmax().view(1)
            pos += 1
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = min(best, (time.perf_counter() - t0) / 30)
    print(f"{os.getcwd()}: {1 / best:.2f} tok/s ({best * 1e3:.2f} ms/token, best of 3 x 30 steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
