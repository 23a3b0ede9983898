"""One Mixtral-8x7B-shape expert at T=1 on the CPU: dequantize-then-matmul (plain torch,
runtime.experts.plain_expert_ffn) against the numba kernel (runtime.experts.expert_ffn's CPU
path), and the relative difference between them.

    python tools/cpu_path_compare.py [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import kernel_bench as kb  # noqa: E402

from formats.qtensor import QuantSpec  # noqa: E402
from runtime.experts import expert_ffn, plain_expert_ffn  # noqa: E402

SPECS = {"2-bit g16": QuantSpec(2, 16, 8, 128), "3-bit g64": QuantSpec(3, 64, 8, 128)}


def median_ms(fn, runs: int) -> float:
    fn()  # warm-up: numba loads or compiles its kernel here
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"{'expert':<12}{'plain torch ms':>16}{'kernel ms':>12}{'speed-up':>10}{'rel diff':>11}")
    for name, spec in SPECS.items():
        layout = kb.expert_layout(4096, 14336, spec)
        rec = kb.random_record(layout, torch.device("cpu"), gen)
        x = torch.randn(1, 4096, generator=gen)
        plain = median_ms(lambda: plain_expert_ffn(rec, layout, x, torch.float32), args.runs)
        fast = median_ms(lambda: expert_ffn(rec, layout, x, torch.float32), args.runs)
        a, b = plain_expert_ffn(rec, layout, x, torch.float32), expert_ffn(rec, layout, x, torch.float32)
        print(f"{name:<12}{plain:>16.0f}{fast:>12.1f}{plain / fast:>9.0f}x{float((a - b).norm() / a.norm()):>11.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
