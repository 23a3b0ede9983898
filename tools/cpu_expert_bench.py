"""Benchmark of runtime.cpu_expert (one packed Mixtral-8x7B expert at batch 1 on the CPU)
across thread counts, against the memory-bandwidth floor and llama.cpp's CPU figure.

    python tools/cpu_expert_bench.py                  # 16-core host: threads 1, 2, 4, 8, 16
    python tools/cpu_expert_bench.py --quick          # small machine: fewer runs
    python tools/cpu_expert_bench.py --json out.json  # machine-readable results as well
    python tools/cpu_expert_bench.py --tokens 1 --tokens 16   # also a prompt's share of an expert
    python tools/cpu_expert_bench.py --cpu-activations int8   # the kernel's int8 activations
    tools/ggml_expert_bench.c                         # llama.cpp's kernel on the same expert (ggml, C)
    MOEPACK_CPU_KERNEL=numba python tools/cpu_expert_bench.py   # the numba kernel instead

Also times one Mixtral attention layer (q, k, v, o at 4-bit) at T=1: packed through
QuantLinear's CPU kernel against a dense float32 matmul.

Records are random bytes with sane meta (timing does not depend on values); two copies are
alternated so a call never finds the previous call's record in the last-level cache. The
floor is record bytes / the best copy bandwidth measured (numpy's single-threaded copy or a
numba copy on all threads, read + write bytes counted). llama.cpp's reference (FACTS.md 2b):
CPU-only decoding at 10.4 tok/s on the 16-core host with 64 expert calls per token, i.e. at
most 1 / (10.4 * 64) = 1.50 ms per expert call, attention and everything else included.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import kernel_bench as kb  # noqa: E402  (the same random records as the GPU kernel bench)

from formats.qtensor import QuantSpec  # noqa: E402
from runtime.cpu_expert import cpu_expert_available, cpu_expert_ffn  # noqa: E402
from runtime.cpu_native import ACTIVATIONS, cpu_activations_in_use, set_cpu_activations  # noqa: E402

HIDDEN, INTER = 4096, 14336
SPECS = {"2-bit g16": QuantSpec(2, 16, 8, 128), "3-bit g64": QuantSpec(3, 64, 8, 128),
         "2-bit g16 m4": QuantSpec(2, 16, 4, 128)}  # 4-bit meta codes: 16% fewer bytes to read
LLAMA_CPP_MS = 1e3 / (10.4 * 64)


def copy_bandwidth(nbytes: int = 1 << 29) -> dict:
    """GB/s of a large copy (read + write bytes): numpy (one thread) and numba (all threads)."""
    src, dst = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
    out = {}
    np.copyto(dst, src)
    out["numpy_copy_gbs"] = 2 * nbytes / min(_timed(lambda: np.copyto(dst, src)) for _ in range(3)) / 1e9
    try:
        import numba

        @numba.njit(parallel=True)
        def pcopy(d, s):
            n = s.size // 64
            for i in numba.prange(64):
                d[i * n:(i + 1) * n] = s[i * n:(i + 1) * n]

        s64, d64 = src.view(np.float64), dst.view(np.float64)
        pcopy(d64, s64)
        out["numba_copy_gbs"] = 2 * nbytes / min(_timed(lambda: pcopy(d64, s64)) for _ in range(3)) / 1e9
    except ImportError:
        pass
    return out


ATTENTION = ((4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096))  # q, k, v, o of one Mixtral layer


def attention_layer(threads: list[int], runs: int) -> list[dict]:
    """One layer's q/k/v/o at 4-bit g64 (the attention default) and T=1: packed through
    QuantLinear's CPU kernel against F.linear on the dequantized float32 weights."""
    from formats.qtensor import encode_matrix
    from runtime.qlinear import QuantLinear

    spec, rng = QuantSpec(4, 64, 8, 256), np.random.default_rng(0)
    mods = []
    for n, k in ATTENTION:
        g = n * k // spec.group_size
        data = encode_matrix(spec, q=rng.integers(0, 16, (n, k)), scale=rng.uniform(0.01, 0.1, g),
                             zero=rng.uniform(0, 15, g))
        mods.append(QuantLinear(torch.frombuffer(bytearray(data), dtype=torch.uint8), (n, k), spec, torch.float32))
    dense = [m.weight().contiguous() for m in mods]
    x = torch.randn(1, 4096)
    rows, saved = [], torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(t)
            res = {}
            for name, fn in (("packed_ms", lambda: [m(x) for m in mods]),
                             ("dense_ms", lambda: [torch.nn.functional.linear(x, w) for w in dense])):
                fn()
                res[name] = statistics.median(_timed(fn) for _ in range(runs)) * 1e3
            rows.append({"case": "attention layer 4-bit g64", "threads": t, **res})
            print(f"{'attention':<10} {t:>7} packed {res['packed_ms']:.2f} ms, dense float32 {res['dense_ms']:.2f} ms")
    finally:
        torch.set_num_threads(saved)
    return rows


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def kernel_name() -> str:
    """Which CPU kernel served the Mixtral layouts (MOEPACK_CPU_KERNEL picks)."""
    from runtime.cpu_native import native_kernel

    k = native_kernel()
    return f"compiled ({k.path.name}, avx2={k.avx2}, vnni={k.vnni}, wide={k.wide}, int8_wide={k.act8_wide})" if k is not None else "numba"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs (a 2-core machine)")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per case (default 9, --quick 3)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--pool-mib", type=int, default=1024,
                    help="rotate the timed calls over copies of the record totalling this much (default 1024: "
                         "more than a server's L3, so every call reads DRAM as in decode; 0: two records)")
    ap.add_argument("--tokens", type=int, action="append", default=None,
                    help="tokens per call, repeatable (default 1: decode; a 512-token prompt gives each "
                         "expert ~128, in calls the CPU path takes up to 256)")
    ap.add_argument("--cpu-activations", choices=ACTIVATIONS, default=None,
                    help="what the compiled kernel rounds activations to [default: MOEPACK_CPU_ACT, else auto, "
                         "which is int16 here: no model is loaded]")
    args = ap.parse_args(argv)
    if args.cpu_activations:
        set_cpu_activations(args.cpu_activations)
    tokens = args.tokens or [1]
    if min(tokens) < 1:
        ap.error("--tokens takes a positive number of tokens per call")
    if not cpu_expert_available():
        print("numba is not installed: cpu_expert_ffn would fall back to the plain torch path", file=sys.stderr)
        return 1
    runs = args.runs or (3 if args.quick else 9)
    ncpu = os.cpu_count() or 1
    threads = [t for t in (1, 2, 4, 8, 16) if t <= ncpu]
    bw = copy_bandwidth(1 << 28 if args.quick else 1 << 29)
    best_gbs = max(bw.values())
    gen = torch.Generator().manual_seed(0)
    xs = {n: 0.1 * torch.randn(n, HIDDEN, generator=gen) for n in tokens}  # [T, H]
    rows = []
    print(f"{ncpu} CPUs; kernel {kernel_name()}, {cpu_activations_in_use()} activations; records rotated over >= {args.pool_mib} MiB; copy bandwidth " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bw.items()))
    print(f"{'expert':<12} {'tokens':>6} {'threads':>7} {'ms':>8} {'min ms':>8} {'max ms':>8} {'ms/token':>8} {'GB/s':>6} {'floor ms':>8} "
          f"{'llama.cpp ms':>12}")
    for name, spec in SPECS.items():
        layout = kb.expert_layout(HIDDEN, INTER, spec)
        # rotate over more bytes than any L3 holds: in decode each expert comes cold from DRAM,
        # and two records (134 MB) may sit in a large server L3 (copies: the cache cares about
        # addresses, not contents)
        first = kb.random_record(layout, torch.device("cpu"), gen)
        n_rec = max(2, -(-(args.pool_mib << 20) // layout.record_size))
        records = [first] + [first.clone() for _ in range(n_rec - 1)]
        floor_ms = layout.record_size / (best_gbs * 1e9) * 1e3
        cpu_expert_ffn(records[0], layout, xs[tokens[0]], threads=max(threads))  # compile or load numba's cache
        for n, x in xs.items():
            for t in threads:
                cpu_expert_ffn(records[-1], layout, x, threads=t)  # warm-up at this thread count
                ts = [_timed(lambda: cpu_expert_ffn(records[i % len(records)], layout, x, threads=t)) for i in range(runs)]
                ms = statistics.median(ts) * 1e3
                rows.append({"expert": name, "tokens": n, "threads": t, "ms": ms, "ms_per_token": ms / n,
                             "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3,
                             "record_bytes": layout.record_size, "pool_bytes": len(records) * layout.record_size,
                             "gbs": layout.record_size / ms / 1e6, "floor_ms": floor_ms, "llama_cpp_ms": LLAMA_CPP_MS})
                row = rows[-1]
                print(f"{name:<12} {n:>6} {t:>7} {ms:>8.2f} {row['min_ms']:>8.2f} {row['max_ms']:>8.2f} {ms / n:>8.2f} "
                      f"{row['gbs']:>6.1f} {floor_ms:>8.2f} "
                      f"{LLAMA_CPP_MS:>12.2f}")
    print(f"llama.cpp CPU-only: 10.4 tok/s x 64 expert calls on 16 cores -> <= {LLAMA_CPP_MS:.2f} ms per call, everything included")
    attention = attention_layer(threads, runs)
    if args.json:
        args.json.write_text(json.dumps({"cpus": ncpu, "bandwidth": bw, "rows": rows, "attention": attention,
                                         "kernel": kernel_name(), "cpu_activations": cpu_activations_in_use()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
