"""Which CPU expert kernel serves on this machine, and how fast one Mixtral-shape 2-bit expert
runs from pageable and from pinned host memory (the offload engine's host tier is pinned).

    python tools/cpu_diag.py

Written for the H100 host of 2026-11-23, where the hybrid engine saw CPU experts take seconds
inside decode while this script timed them at ~1 ms (docs/BENCHMARKS.md section 8). Prints the
kernel's path, the torch thread count, a random token against a zero one (the kernel skips
words of zero activations) at 1, 8 and 16 threads, and a plain read of the record.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kernel_bench as kb  # noqa: E402

from runtime import cpu_build, cpu_native  # noqa: E402
from runtime.cpu_expert import cpu_expert_ffn, cpu_expert_hidden  # noqa: E402


def median_ms(fn, record, layout, x, threads, n: int = 5) -> float:
    fn(record, layout, x, threads=threads)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(record, layout, x, threads=threads)
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[n // 2]


def main() -> int:
    warnings.simplefilter("always")
    print("torch threads", torch.get_num_threads(), "PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS"),
          "cc", cpu_build._compiler())
    k = cpu_native.native_kernel()
    print("native:", k and k.path, "avx2", k and k.avx2, "vnni", k and k.vnni, "wide", k and k.wide)
    layout = kb.expert_layout(kb.MIXTRAL.hidden, kb.MIXTRAL.intermediate, kb.EXPERT_SPECS["2-bit g16"])
    rec = kb.random_record(layout, torch.device("cpu"), torch.Generator().manual_seed(0))
    x = torch.randn(1, kb.MIXTRAL.hidden)
    threads = [t for t in (1, 8, 16) if t <= (os.cpu_count() or 1)]
    for t in threads:
        print(f"pageable threads {t}: {median_ms(cpu_expert_ffn, rec, layout, x, t):.2f} ms"
              f"  zeros {median_ms(cpu_expert_ffn, rec, layout, torch.zeros_like(x), t):.2f} ms")
    if torch.cuda.is_available():
        pin = torch.empty_like(rec, pin_memory=True)
        pin.copy_(rec)
        arena = torch.empty((64, rec.numel()), dtype=torch.uint8, pin_memory=True)  # a 4 GB pinned arena
        arena[5].copy_(rec)
        torch.ones(4, device="cuda").sum().item()
        for t in threads:
            print(f"pinned threads {t}: {median_ms(cpu_expert_ffn, pin, layout, x, t):.2f} ms"
                  f"  arena row {median_ms(cpu_expert_ffn, arena[5], layout, x, t):.2f} ms"
                  f"  w1/w3 only {median_ms(cpu_expert_hidden, arena[5], layout, x, t):.2f} ms")
        t0 = time.perf_counter()
        rec.numpy().view(np.uint64).sum()
        t1 = time.perf_counter()
        pin.numpy().view(np.uint64).sum()
        t2 = time.perf_counter()
        print(f"numpy sum of the record: pageable {1e3 * (t1 - t0):.1f} ms, pinned {1e3 * (t2 - t1):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
