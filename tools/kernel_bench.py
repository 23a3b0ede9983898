"""Benchmark of the fused dequantize-matmul kernels (runtime/kernels) against the plain
dequantize-then-matmul path, on Mixtral-8x7B shapes.

    python tools/kernel_bench.py                  # H100: table of the decode and prefill cases
    python tools/kernel_bench.py --sweep          # also time candidate launch configs per shape
    python tools/kernel_bench.py --json out.json  # machine-readable results as well
    TRITON_INTERPRET=1 python tools/kernel_bench.py --tiny   # CPU smoke run (tiny shapes)

Weights are random bytes with sane scales (the timing does not depend on values); several
copies are rotated so no measurement reads weights that the previous one left in L2, and
triton's do_bench also flushes L2 between runs. The memory floor is bytes read / HBM
bandwidth, the bandwidth measured with a large device-to-device copy (read + write bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from formats.errors import MoepackError  # noqa: E402
from formats.header import ExpertLayout, MatrixLayout  # noqa: E402
from formats.qtensor import QuantSpec, matrix_layout  # noqa: E402
from formats.spec import ALIGNMENT, COMPONENT_ALIGNMENT, align_up  # noqa: E402
from runtime.dequant import component_tensors, dequantize  # noqa: E402
from runtime.experts import plain_expert_ffn  # noqa: E402
from runtime.kernels import (  # noqa: E402
    fused_expert_ffn,
    grouped_expert_ffn,
    indexed_expert_ffn,
    indexed_supported,
    interpreting,
    qmatmul,
    use_fused,
)
from runtime.kernels.configs import GemvConfig, candidate_configs, pick_gemv_config  # noqa: E402
from runtime.kernels.prefill import PREFILL_ENV  # noqa: E402
from runtime.kernels.words import int_x_ok  # noqa: E402
from runtime.kernels.timing import capture_graph, fill_random, random_matrix, rotating  # noqa: E402,F401 (shared with runtime.tune)

L2_BYTES = 50 << 20  # H100 L2
ROTATE_BYTES = 4 * L2_BYTES  # weight copies rotated per measurement add up to at least this

EXPERT_SPECS = {
    "2-bit g16": QuantSpec(2, 16, 8, 128),
    "3-bit g64": QuantSpec(3, 64, 8, 128),
    "4-bit g64": QuantSpec(4, 64, 8, 256),
    "2-bit g16 m4": QuantSpec(2, 16, 4, 128),  # 4-bit meta codes (format version 2): 16% fewer bytes
    "3-bit g64 m4": QuantSpec(3, 64, 4, 128),
}
ATTN_SPEC = QuantSpec(4, 64, 8, 256)
TARGET_US = {"expert 2-bit g16": 50.0, "expert 3-bit g64": 60.0, "attention 4-bit g64": 40.0,
             "expert 2-bit g16 m4": 50.0, "expert 3-bit g64 m4": 60.0}


@dataclass(frozen=True)
class Shapes:
    hidden: int
    intermediate: int
    kv: int  # k/v projection rows (kv heads x head dim)
    prefill: int


MIXTRAL = Shapes(hidden=4096, intermediate=14336, kv=1024, prefill=512)
TINY = Shapes(hidden=64, intermediate=128, kv=32, prefill=20)


@dataclass
class Row:
    case: str
    tokens: int
    path: str  # "fused" (GEMV kernels), "dequant+mm" (Triton dequantize + dense matmul), "plain" (torch)
    us: float
    bytes_read: int
    floor_us: float
    floor_frac: float
    speedup_vs_plain: float | None = None
    target_us: float | None = None
    rel_err: float | None = None
    config: str | None = None
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------ random packed weights

def expert_layout(hidden: int, intermediate: int, spec: QuantSpec) -> ExpertLayout:
    """w1, w3 [I, H] and w2 [H, I] back to back, as formats.writer lays out a record."""
    mats, offset = [], 0
    for name, shape in (("w1", (intermediate, hidden)), ("w3", (intermediate, hidden)), ("w2", (hidden, intermediate))):
        mats.append(MatrixLayout(name, shape, spec, offset))
        offset = align_up(offset + mats[-1].nbytes, COMPONENT_ALIGNMENT)
    return ExpertLayout(align_up(offset, ALIGNMENT), tuple(mats))


def random_record(layout: ExpertLayout, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    buf = torch.randint(0, 256, (layout.record_size,), dtype=torch.uint8, generator=gen)
    for m in layout.matrices:
        fill_random(buf, m.shape, m.spec, m.offset, gen)
    return buf.to(device)


def copies_for(nbytes: int, tiny: bool) -> int:
    return 2 if tiny else max(2, -(-ROTATE_BYTES // max(nbytes, 1)))


# ------------------------------------------------------------------ timing

class Timer:
    """graph=True: time CUDA-graph replays of the call instead of eager calls. An eager call's
    time includes its Python and launch overhead whenever that exceeds the GPU time (the GPU
    idles between launches); a replay launches the same kernels with none of it, so the two
    columns split a case into kernel time and overhead."""

    def __init__(self, device: torch.device, rep_ms: int, tiny: bool, graph: bool = False):
        self.device, self.rep_ms, self.tiny, self.graph = device, rep_ms, tiny, graph

    def median_us(self, fn) -> float:
        """Median time of fn() in microseconds (do_bench on CUDA; wall clock under the interpreter)."""
        if self.device.type == "cuda":
            import triton.testing

            calls = getattr(fn, "calls", 1)
            if self.graph:
                fn = self._graph(fn, calls)
                if fn is None:
                    return float("nan")
            us = 1e3 * triton.testing.do_bench(fn, warmup=max(5, self.rep_ms // 4), rep=self.rep_ms, return_mode="median")
            return us / calls if self.graph else us
        if not self.tiny:
            fn()  # warm-up (the interpreter has nothing to compile: skip it for --tiny)
        times = []
        for _ in range(1 if self.tiny else 5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e6 * statistics.median(times)


    def _graph(self, fn, calls: int):
        """A callable replaying `calls` successive calls of fn captured in one CUDA graph (one
        pass over every rotated copy), or None when fn cannot be captured (a host sync)."""
        try:
            g = capture_graph(fn, calls, self.device)
        except RuntimeError as e:
            print(f"  (not capturable: {str(e).splitlines()[0][:100]})", file=sys.stderr)
            torch.cuda.synchronize(self.device)
            return None
        return g.replay


def hbm_bandwidth(device: torch.device, timer: Timer, tiny: bool) -> float:
    """Bytes per second of a large device-to-device copy, counting read + write."""
    n = (8 << 20) if tiny else (1 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = timer.median_us(lambda: dst.copy_(src))
    return 2 * n / (us * 1e-6)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.float(), ref.float()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


# ------------------------------------------------------------------ cases

def other_path(*configs: GemvConfig) -> tuple[GemvConfig, ...]:
    """The configs of one layer's launches with the other activation path than the first one's
    (the picked path, tuned table or heuristic, gets its twin row beside it)."""
    flip = not configs[0].int_x
    return tuple(replace(c, int_x=flip) for c in configs)


def path_name(config: GemvConfig) -> str:
    return "int16-x" if config.int_x else "float-x"


def bench_expert(name: str, spec: QuantSpec, shapes: Shapes, device, dtype, timer: Timer, bw: float,
                 tokens: list[int], gen: torch.Generator, tiny: bool) -> list[Row]:
    layout = expert_layout(shapes.hidden, shapes.intermediate, spec)
    wbytes = sum(m.nbytes for m in layout.matrices)
    copies = copies_for(layout.record_size, tiny)
    records = [random_record(layout, device, gen) for _ in range(copies)]
    case, rows = f"expert {name}", []
    plain_us = {}
    for t in sorted({1, shapes.prefill}):
        xs = [torch.randn(t, shapes.hidden, generator=gen).to(device, dtype) for _ in range(copies)]
        plain_us[t] = timer.median_us(rotating(lambda i: plain_expert_ffn(records[i], layout, xs[i], dtype), copies))
        rows.append(Row(case, t, "plain", plain_us[t], wbytes, wbytes / bw * 1e6, (wbytes / bw * 1e6) / plain_us[t]))
    for t in [*tokens, shapes.prefill]:
        xs = [torch.randn(t, shapes.hidden, generator=gen).to(device, dtype) for _ in range(copies)]
        ref = plain_expert_ffn(records[0], layout, xs[0].float(), torch.float32)
        err = rel_err(fused_expert_ffn(records[0], layout, xs[0]), ref)
        us = timer.median_us(rotating(lambda i: fused_expert_ffn(records[i], layout, xs[i]), copies))
        floor = wbytes / bw * 1e6
        path = "dequant+mm" if t == shapes.prefill else "fused"
        cfg = None
        if path == "fused":
            w13 = pick_gemv_config(shapes.intermediate, shapes.hidden, t, spec, gated=True)
            w2 = pick_gemv_config(shapes.hidden, shapes.intermediate, t, spec)
            cfg = f"w13 {w13.short()} / w2 {w2.short()}"
        base = plain_us.get(t)
        rows.append(Row(case, t, path, us, wbytes, floor, floor / us, base / us if base else None,
                        TARGET_US.get(case) if t == 1 else None, err, cfg))
        if path == "fused" and int_x_ok(shapes.hidden, spec):
            alt = dict(zip(("w13", "w2"), other_path(w13, w2)))
            err = rel_err(fused_expert_ffn(records[0], layout, xs[0], configs=alt), ref)
            us = timer.median_us(rotating(lambda i: fused_expert_ffn(records[i], layout, xs[i], configs=alt), copies))
            rows.append(Row(case, t, "fused " + path_name(alt["w13"]), us, wbytes, floor,
                            floor / us, base / us if base else None, TARGET_US.get(case) if t == 1 else None, err,
                            f"w13 {alt['w13'].short()} / w2 {alt['w2'].short()}"))
    rows += bench_indexed(case, layout, records, shapes, device, dtype, timer, bw, gen)
    if int_x_ok(shapes.hidden, spec):
        alt = dict(zip(("w13", "w2"), other_path(pick_gemv_config(shapes.intermediate, shapes.hidden, 1, spec, gated=True),
                                                 pick_gemv_config(shapes.hidden, shapes.intermediate, 1, spec))))
        rows += bench_indexed(case, layout, records, shapes, device, dtype, timer, bw, gen, configs=alt,
                              label=" " + path_name(alt["w13"]))
    rows += bench_prefill_paths(case, layout, records, shapes, device, dtype, timer, bw, gen)
    return rows


def bench_prefill_paths(case: str, layout: ExpertLayout, records: list[torch.Tensor], shapes: Shapes, device, dtype,
                        timer: Timer, bw: float, gen: torch.Generator) -> list[Row]:
    """The many-token path both ways (kernels/prefill.py): W dequantized into scratch + a dense
    matmul, against the fused dequantize-GEMM (MOEPACK_PREFILL=fused), at a 512-token prompt's
    tokens per expert (512 * 2 / 8 = 128) and at the whole prompt."""
    wbytes = sum(m.nbytes for m in layout.matrices)
    rows = []
    for t in sorted({shapes.prefill // 4, shapes.prefill}):
        xs = [torch.randn(t, shapes.hidden, generator=gen).to(device, dtype) for _ in range(len(records))]
        ref = plain_expert_ffn(records[0], layout, xs[0].float(), torch.float32)
        for mode, path in (("dequant", "dequant+mm"), ("fused", "fused gemm")):
            with prefill_env(mode):
                err = rel_err(fused_expert_ffn(records[0], layout, xs[0]), ref)
                us = timer.median_us(rotating(lambda i: fused_expert_ffn(records[i], layout, xs[i]), len(records)))
            floor = wbytes / bw * 1e6
            rows.append(Row(case, t, path, us, wbytes, floor, floor / us, None, None, err,
                            f"{t / us * 1e6:.0f} tokens/s through one expert"))
    # a layer's experts grouped (ResidentExperts under MOEPACK_PREFILL=fused): every expert's
    # rows in two launches, time per expert
    t = shapes.prefill // 4
    buf = torch.stack(records)
    e = min(8, buf.shape[0])
    if indexed_supported(buf, layout, torch.zeros(1, shapes.hidden, dtype=dtype, device=device)):
        xs = torch.randn(e * t, shapes.hidden, generator=gen).to(device, dtype)
        offsets = torch.arange(0, (e + 1) * t, t, device=device)
        ref = plain_expert_ffn(records[1], layout, xs[t:2 * t].float(), torch.float32)
        err = rel_err(grouped_expert_ffn(buf, 0, offsets, xs, layout, t)[t:2 * t], ref)
        us = timer.median_us(lambda: grouped_expert_ffn(buf, 0, offsets, xs, layout, t)) / e
        floor = wbytes / bw * 1e6
        rows.append(Row(case, t, f"grouped x{e}", us, wbytes, floor, floor / us, None, None, err,
                        f"{e} experts of {t} rows per launch, time per expert"))
    return rows


@contextlib.contextmanager
def prefill_env(mode: str):
    old = os.environ.get(PREFILL_ENV)
    os.environ[PREFILL_ENV] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(PREFILL_ENV, None)
        else:
            os.environ[PREFILL_ENV] = old


def bench_indexed(case: str, layout: ExpertLayout, records: list[torch.Tensor], shapes: Shapes, device, dtype,
                  timer: Timer, bw: float, gen: torch.Generator, k: int = 2, configs: dict | None = None,
                  label: str = "") -> list[Row]:
    """A token's k experts chosen on the device (kernels.indexed_expert_ffn: two launches for
    all k, what a resident decode step runs): the time per expert, so it compares with the
    one-expert row and its target."""
    if not indexed_supported(torch.stack(records[:1]), layout, torch.zeros(1, shapes.hidden, dtype=dtype, device=device)):
        return []
    buf = torch.stack(records)  # [copies, record_size]: each call reads k distinct copies, none in L2
    n = buf.shape[0]
    sels = [torch.tensor([(k * i + j) % n for j in range(k)], device=device) for i in range(n)]
    w = torch.full((k,), 1.0 / k, dtype=dtype, device=device)
    x = torch.randn(1, shapes.hidden, generator=gen).to(device, dtype)
    ref = sum(plain_expert_ffn(records[int(r)], layout, x.float(), torch.float32) for r in sels[0].tolist()) / k
    err = rel_err(indexed_expert_ffn(buf, sels[0], w, layout, x, configs), ref)
    us = timer.median_us(rotating(lambda i: indexed_expert_ffn(buf, sels[i], w, layout, x, configs), n)) / k
    wbytes = sum(m.nbytes for m in layout.matrices)
    floor = wbytes / bw * 1e6
    return [Row(case, 1, f"indexed x{k}{label}", us, wbytes, floor, floor / us, None, TARGET_US.get(case), err,
                f"{k} experts per launch, time per expert")]


def attention_shapes(shapes: Shapes) -> dict[str, tuple[int, int]]:
    h = shapes.hidden
    return {"q": (h, h), "k": (shapes.kv, h), "v": (shapes.kv, h), "o": (h, h)}


def bench_attention(shapes: Shapes, device, dtype, timer: Timer, bw: float, tokens: list[int],
                    gen: torch.Generator, tiny: bool) -> list[Row]:
    mats = attention_shapes(shapes)
    nbytes = sum(matrix_layout(s, ATTN_SPEC)[1] for s in mats.values())
    copies = copies_for(nbytes, tiny)
    layers = [{k: component_tensors(random_matrix(s, ATTN_SPEC, device, gen), s, ATTN_SPEC) for k, s in mats.items()}
              for _ in range(copies)]

    def fused(i, x):
        return [qmatmul(x, layers[i][k], s, ATTN_SPEC) for k, s in mats.items()]

    def plain(i, x):
        return [F.linear(x, dequantize(layers[i][k], s, ATTN_SPEC, x.dtype)) for k, s in mats.items()]

    # q, k and v stacked into one matrix as the loader does (Attention.fuse_qkv), then o
    qkv_shape = (shapes.hidden + 2 * shapes.kv, shapes.hidden)
    stacked = [component_tensors(random_matrix(qkv_shape, ATTN_SPEC, device, gen), qkv_shape, ATTN_SPEC)
               for _ in range(copies)]

    def fused_qkv(i, x):
        return [qmatmul(x, stacked[i], qkv_shape, ATTN_SPEC), qmatmul(x, layers[i]["o"], mats["o"], ATTN_SPEC)]

    case, rows, floor = "attention 4-bit g64", [], nbytes / bw * 1e6
    x1 = [torch.randn(1, shapes.hidden, generator=gen).to(device, dtype) for _ in range(copies)]
    plain_us = timer.median_us(rotating(lambda i: plain(i, x1[i]), copies))
    rows.append(Row(case, 1, "plain", plain_us, nbytes, floor, floor / plain_us))
    us = timer.median_us(rotating(lambda i: fused_qkv(i, x1[i]), copies))
    cfg = f"qkv {pick_gemv_config(*qkv_shape, 1, ATTN_SPEC).short()} o {pick_gemv_config(*mats['o'], 1, ATTN_SPEC).short()}"
    rows.append(Row(case, 1, "fused qkv+o", us, nbytes, floor, floor / us, plain_us / us, TARGET_US[case], None, cfg))
    if int_x_ok(shapes.hidden, ATTN_SPEC):  # the other activation path, side by side
        cq, co = other_path(pick_gemv_config(*qkv_shape, 1, ATTN_SPEC), pick_gemv_config(*mats["o"], 1, ATTN_SPEC))

        def fused_qkv_alt(i, x):
            return [qmatmul(x, stacked[i], qkv_shape, ATTN_SPEC, config=cq),
                    qmatmul(x, layers[i]["o"], mats["o"], ATTN_SPEC, config=co)]

        us = timer.median_us(rotating(lambda i: fused_qkv_alt(i, x1[i]), copies))
        rows.append(Row(case, 1, "fused qkv+o " + path_name(cq), us, nbytes, floor,
                        floor / us, plain_us / us, TARGET_US[case], None, f"qkv {cq.short()} o {co.short()}"))
    for t in tokens:
        xs = [torch.randn(t, shapes.hidden, generator=gen).to(device, dtype) for _ in range(copies)]
        err = max(rel_err(a, F.linear(xs[0].float(), dequantize(layers[0][k], s, ATTN_SPEC, torch.float32)))
                  for a, (k, s) in zip(fused(0, xs[0]), mats.items()))
        us = timer.median_us(rotating(lambda i: fused(i, xs[i]), copies))
        cfg = " ".join(f"{k} {pick_gemv_config(*s, t, ATTN_SPEC).short()}" for k, s in mats.items() if k in "qk")
        rows.append(Row(case, t, "fused", us, nbytes, floor, floor / us, plain_us / us if t == 1 else None,
                        TARGET_US[case] if t == 1 else None, err, cfg))
    return rows


def sweep(shapes: Shapes, device, dtype, timer: Timer, bw: float, tokens: list[int], gen: torch.Generator,
          tiny: bool, only: str = "") -> list[dict]:
    """Time every candidate config of each GEMV shape; the best per shape comes first."""
    from runtime.kernels.qgemv import gemv

    cases = []
    for name, spec in EXPERT_SPECS.items():
        cases.append((f"w13 {name}", (shapes.intermediate, shapes.hidden), spec, True))
        cases.append((f"w2 {name}", (shapes.hidden, shapes.intermediate), spec, False))
    for k, s in attention_shapes(shapes).items():
        if k in "qk":
            cases.append((f"attn {k} 4-bit g64", s, ATTN_SPEC, False))
    out = []
    for label, shape, spec, gated in cases:
        if only not in label:
            continue
        nbytes = matrix_layout(shape, spec)[1] * (2 if gated else 1)
        copies = copies_for(nbytes, tiny)
        mats = [[component_tensors(random_matrix(shape, spec, device, gen), shape, spec) for _ in range(2 if gated else 1)]
                for _ in range(copies)]
        for t in tokens:
            x = torch.randn(t, shape[1], generator=gen).to(device, dtype)
            results = []
            for cfg in candidate_configs(shape[0], shape[1], t, spec, gated):
                try:
                    us = timer.median_us(rotating(lambda i: gemv(x, mats[i], shape, spec, cfg), copies))
                except Exception as e:  # a config the compiler rejects (registers, shared memory) is just skipped
                    results.append({"config": cfg.short(), "error": repr(e)[:200]})
                    continue
                results.append({"config": cfg.short(), "us": us, "floor_frac": nbytes / bw * 1e6 / us, **asdict(cfg)})
            results.sort(key=lambda r: r.get("us", float("inf")))
            out.append({"case": label, "tokens": t, "shape": list(shape), "gated": gated, "results": results,
                        "spec": f"QuantSpec({spec.bits}, {spec.group_size}, {spec.meta_bits}, {spec.meta_group_size})"})
    return out


# ------------------------------------------------------------------ output

def print_table(rows: list[Row], bw: float, device: str) -> None:
    print(f"device: {device}   measured copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)"
          + ("   [CUDA-graph replays]" if getattr(print_table, "graph", False) else ""))
    head = f"{'case':<22}{'T':>5} {'path':<11}{'median us':>11}{'MB read':>9}{'floor us':>10}{'% floor':>9}" \
           f"{'vs plain':>9}{'target':>8}{'rel err':>10}  config"
    print(head)
    print("-" * len(head))
    for r in rows:
        vs = f"{r.speedup_vs_plain:.1f}x" if r.speedup_vs_plain else ""
        tgt = f"{r.target_us:.0f}" + (" ok" if r.us <= r.target_us else " !") if r.target_us else ""
        err = f"{r.rel_err:.1e}" if r.rel_err is not None else ""
        print(f"{r.case:<22}{r.tokens:>5} {r.path:<11}{r.us:>11.1f}{r.bytes_read / 1e6:>9.2f}{r.floor_us:>10.1f}"
              f"{100 * r.floor_frac:>8.1f}%{vs:>9}{tgt:>8}{err:>10}  {r.config or ''}")


def print_sweep(results: list[dict]) -> None:
    best = []
    for case in results:
        ok = [r for r in case["results"] if "us" in r]
        print(f"\nsweep {case['case']} T={case['tokens']} {case['shape']}: {len(ok)} configs"
              f" ({len(case['results']) - len(ok)} failed)")
        for r in ok[:5]:
            print(f"  {r['config']:<18}{r['us']:>9.1f} us  {100 * r['floor_frac']:5.1f}% of floor")
        if ok:
            cfg = {k: ok[0][k] for k in ("block_n", "block_k", "split_k", "num_warps", "num_stages", "permute_x", "int_x")
                   if k in ok[0]}
            args = ", ".join(f"{k}={v}" for k, v in cfg.items())
            best.append(f"register_config({case['shape'][0]}, {case['shape'][1]}, {case['tokens']}, {case['spec']}, "
                        f"{case['gated']}, GemvConfig({args}))")
    if best:
        print("\n# winners, for runtime/kernels/configs.py (from formats.qtensor import QuantSpec):")
        print("\n".join(best))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (runs under TRITON_INTERPRET=1 on the CPU)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-' for stdout)")
    p.add_argument("--sweep", action="store_true", help="time candidate GEMV launch configs per shape")
    p.add_argument("--tokens", default="1,2,4,8", help="decode token counts (default 1,2,4,8)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time per case (ms)")
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--graph", action="store_true",
                   help="time CUDA-graph replays (kernel time without Python/launch overhead)")
    p.add_argument("--only", metavar="TEXT", default="",
                   help="only cases whose name contains TEXT (e.g. '2-bit', 'attention', 'w2')")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        tokens = [int(t) for t in args.tokens.split(",") if t]
    except ValueError:
        print(f"error: --tokens {args.tokens!r} is not a comma-separated list of integers", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not use_fused(torch.empty(0, device=device)):
        print("error: the fused kernels cannot run here (needs a CUDA GPU with triton installed)\n"
              "hint: on a CPU, run `TRITON_INTERPRET=1 python tools/kernel_bench.py --tiny`", file=sys.stderr)
        return 2
    if device.type == "cpu" and not args.tiny:
        print("error: full Mixtral shapes under the Triton interpreter would take hours\nhint: add --tiny", file=sys.stderr)
        return 2
    shapes = TINY if args.tiny else MIXTRAL
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    timer = Timer(device, args.rep_ms, args.tiny, graph=args.graph and device.type == "cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (triton interpreter)" if interpreting() else "cpu"
    try:
        bw = hbm_bandwidth(device, timer, args.tiny)
        rows = []
        for label, spec in EXPERT_SPECS.items():
            if args.only in f"expert {label}":
                rows += bench_expert(label, spec, shapes, device, dtype, timer, bw, tokens, gen, args.tiny)
        if args.only in "attention 4-bit g64":
            rows += bench_attention(shapes, device, dtype, timer, bw, tokens, gen, args.tiny)
        sweeps = sweep(shapes, device, dtype, timer, bw, tokens[:1], gen, args.tiny, args.only) if args.sweep else []
    except MoepackError as e:
        print(f"error: {e.message}" + (f"\nhint: {e.hint}" if e.hint else ""), file=sys.stderr)
        return 1
    print_table.graph = timer.graph
    print_table(rows, bw, name)
    if sweeps:
        print_sweep(sweeps)
    if args.json:
        doc = {"device": name, "dtype": args.dtype, "shapes": asdict(shapes), "copy_bandwidth_Bps": bw,
               "rows": [asdict(r) for r in rows], "sweep": sweeps}
        text = json.dumps(doc, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
