"""Static instruction profile of the fused GEMV kernel, without a GPU.

Compiles runtime/kernels/triton_gemv.qgemv_kernel ahead of time for sm_90 (triton's bundled
ptxas) with the launch plan the runtime would use for Mixtral-8x7B shapes, disassembles it
(triton's bundled cuobjdump) and counts the machine instructions of the main loop per weight,
split by the pipe that executes them. With the H100's per-SM throughputs (128 FP32 lanes,
64 INT32 lanes, 4 instruction issues per clock) that gives a lower bound on the kernel time
for each pipe, to compare with the memory floor: a kernel whose busiest pipe needs longer
than its bytes take to arrive cannot reach that floor, whatever its launch parameters.

    python tools/sass_stats.py                 # every case, a table
    python tools/sass_stats.py --case w13-2 --dump /tmp/k.sass
    python tools/sass_stats.py --json stats.json

The triton that compiles matters: the H100 host's torch 2.11 ships triton 3.6, whose layout
passes differ from newer ones (docs/BENCHMARKS.md section 35). To see its code here:

    pip install --no-deps --target /tmp/tri36 triton==3.6.0
    PYTHONPATH=/tmp/tri36 python tools/sass_stats.py

Counts are static (one pass through the loop body); the loop runs TILES times per program.
The deq-* cases profile the prefill path's dequantize kernels (one program per tile, no
loop: the whole kernel is counted; the floor counts the fp16 writes too).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from formats.qtensor import QuantSpec, matrix_layout  # noqa: E402

# H100 SXM: SMs, clock (GHz), lanes per SM per clock of each pipe, HBM bandwidth (B/s)
SMS, CLOCK_GHZ, ISSUE_PER_SM = 132, 1.755, 4
LANES = {"fp": 128, "int": 64, "mem": 32, "sfu": 16}
HBM_BPS = 3.0e12
# SASS opcode -> pipe (the rest counts as "other": control, moves, predicates)
PIPES = {
    "fp": ("FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "HADD2", "HFMA2", "HMUL2", "F2FP"),
    "int": ("LOP3", "SHF", "SGXT", "IMAD", "IADD3", "ISETP", "LEA", "PRMT", "IABS", "IMNMX", "VIADD", "BMSK",
            "SEL", "I2F", "F2I", "FLO", "POPC", "IDP", "BFE", "BFI", "SHL", "SHR", "IMUL", "LOP"),
    "mem": ("LDG", "STG", "LDS", "STS", "LDC", "LD", "ST", "LDSM", "LDGSTS", "ATOM", "RED"),
    "sfu": ("MUFU",),
}
EXPERT = (14336, 4096)  # Mixtral-8x7B w1/w3 [I, H]; w2 is [H, I]
CASES = {
    "w13-2": (EXPERT, QuantSpec(2, 16, 8, 128), True),
    "w2-2": (EXPERT[::-1], QuantSpec(2, 16, 8, 128), False),
    "w13-3": (EXPERT, QuantSpec(3, 64, 8, 128), True),
    "w2-3": (EXPERT[::-1], QuantSpec(3, 64, 8, 128), False),
    # 4-bit scale/zero codes: the quantizer's default for 2-bit experts (format version 2)
    "w13-2m4": (EXPERT, QuantSpec(2, 16, 4, 128), True),
    "w2-2m4": (EXPERT[::-1], QuantSpec(2, 16, 4, 128), False),
    "attn-q-4": ((4096, 4096), QuantSpec(4, 64, 8, 256), False),
    "attn-kv-4": ((1024, 4096), QuantSpec(4, 64, 8, 256), False),
}
# the prefill path: one w1-shape matrix dequantized to fp16 (shape, spec, word-wise kernel?)
DEQUANT_CASES = {
    "deq-2-bytes": (EXPERT, QuantSpec(2, 16, 8, 128), False),
    "deq-2-words": (EXPERT, QuantSpec(2, 16, 8, 128), True),
    "deq-3-bytes": (EXPERT, QuantSpec(3, 64, 8, 128), False),
    "deq-3-words": (EXPERT, QuantSpec(3, 64, 8, 128), True),
}


@dataclass
class Stats:
    case: str
    tokens: int
    config: str
    registers: int
    spill_bytes: int
    local_ops: int  # LDL + STL in the loop body: thread-local memory, which ptxas may use without reporting a spill
    loop_instructions: int
    weights_per_thread_iteration: int
    per_weight: dict  # pipe -> instructions per weight per thread
    mix: dict  # opcode -> count in the loop body
    bound_us: dict  # pipe -> lower bound on the kernel time (us) from that pipe alone
    floor_us: float  # packed bytes / HBM bandwidth


def _bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def compile_case(name: str, tokens: int, config: str | None = None):
    """(compiled kernel, launch plan, bytes read) for one case at `tokens` tokens."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from runtime.kernels.configs import pick_gemv_config
    from runtime.kernels.qgemv import _launch_plan, codes_per_word
    from runtime.kernels.triton_gemv import qgemv_kernel

    shape, spec, gated = CASES[name]
    cfg = pick_gemv_config(*shape, tokens, spec, gated)
    if config:
        cfg = replace(cfg, **parse_config(config)).for_matrix(shape[1], spec)
    # gated: h for a w2 of the same spec, as the expert's launches ask (int16 activations
    # where the row blocks hold whole words, else permuted)
    per = codes_per_word(spec)
    plan = _launch_plan(*shape, tokens, spec, gated, cfg, False, per if gated else 1, 0, per if gated else 0)
    kw = dict(plan.kwargs, ASM=True)  # as compiled for a GPU: int16 activations multiply with dp2a
    opts = dict(num_warps=kw.pop("num_warps"), num_stages=kw.pop("num_stages"), enable_fp_fusion=kw.pop("enable_fp_fusion"))
    meta = "*u8" if spec.coded_meta else "*fp16"
    out = "*fp32" if plan.partial else "*i32" if plan.out_int else "*fp16"
    types = {"x_ptr": "*i32" if plan.int_x else "*fp16", "out_ptr": out, "out2_ptr": out, "sel_ptr": "*i64", "w_ptr": "*fp16"}
    for m in "ab":
        types |= {f"q{m}_ptr": "*i32", f"qh{m}_ptr": "*i16", f"s{m}_ptr": meta, f"z{m}_ptr": meta,
                  f"sm{m}_ptr": "*fp32", f"zm{m}_ptr": "*fp32"}
    sig = {a: types.get(a, "constexpr" if a in kw else "i32") for a in qgemv_kernel.arg_names}
    # what the JIT tells the compiler at a real launch: pointers (torch allocations, record
    # operands at COMPONENT_ALIGNMENT) and the integers that are multiples of 16 are marked
    # divisible by 16, which is what lets it vectorise loads
    n, k = shape
    row = (per // 2 + 2) * (k // per) if plan.int_x else k  # x's row stride in elements
    ints = dict(N=n, RS=1 << 20, stride_xt=row, stride_xe=tokens * row, stride_os=plan.tail[0],
                stride_oe=plan.tail[1], stride_ot=plan.tail[2])
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(qgemv_kernel.arg_names)
             if sig[a].startswith("*") or (a in ints and ints[a] % 16 == 0)}
    kernel = triton.compile(ASTSource(qgemv_kernel, sig, kw, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
    nbytes = matrix_layout(shape, spec)[1] * (2 if gated else 1)
    return kernel, plan, cfg, nbytes


def parse_config(text: str) -> dict:
    """'n64k512s1w4p2' (GemvConfig.short(); any subset of the fields; '-i' int16 activations,
    '-xs' float activations at stride PER, else float activations permuted) -> GemvConfig fields."""
    names = {"n": "block_n", "k": "block_k", "s": "split_k", "w": "num_warps", "p": "num_stages"}
    fields = {names[k]: int(v) for k, v in re.findall(r"([nkswp])(\d+)", text)}
    fields["int_x"] = text.endswith("-i")
    fields["permute_x"] = not text.endswith("-xs")
    return fields


_LINE = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]*)?\s*([^;]*);")


def _instructions(sass: str) -> list[tuple[int, str, str]]:
    return [(int(m.group(1), 16), m.group(2), m.group(4)) for m in map(_LINE.match, sass.splitlines()) if m]


def _main_loop(ins: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """The body of the longest backward branch (the loop over K tiles)."""
    best: list = []
    for addr, op, args in ins:
        if op == "BRA":
            target = re.search(r"0x([0-9a-f]+)", args)
            if target and int(target.group(1), 16) < addr:
                body = [i for i in ins if int(target.group(1), 16) <= i[0] <= addr]
                best = body if len(body) > len(best) else best
    return best


def _sass(kernel, dump: str | None) -> tuple[str, int, int]:
    """(SASS text, registers, local-memory spill bytes) of a compiled kernel."""
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([_bin("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_bin("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                             check=True).stdout
    if dump:
        Path(dump).write_text(sass)
    return sass, int(re.search(r"REG:(\d+)", res).group(1)), int(re.search(r"LOCAL:(\d+)", res).group(1))


def analyse(name: str, tokens: int, config: str, kernel, weights: int, total_weights: int, nbytes: int,
            dump: str | None = None) -> Stats:
    """Stats of `kernel` whose main loop (the whole kernel if it has none) covers `weights`
    weights per thread, `total_weights` in all, reading and writing `nbytes`."""
    sass, regs, spill = _sass(kernel, dump)
    ins = _instructions(sass)
    body = _main_loop(ins) or ins
    mix = collections.Counter(op for _, op, _ in body)
    pipe_of = {op: p for p, ops in PIPES.items() for op in ops}
    per_pipe = collections.Counter()
    for op, n in mix.items():
        per_pipe[pipe_of.get(op, "other")] += n
    bound = {}
    for pipe, n in per_pipe.items():
        lanes = LANES.get(pipe)
        if lanes:
            bound[pipe] = total_weights * n / weights / (SMS * lanes * CLOCK_GHZ * 1e3)
    bound["issue"] = total_weights * sum(per_pipe.values()) / weights / (SMS * ISSUE_PER_SM * 32 * CLOCK_GHZ * 1e3)
    return Stats(name, tokens, config, regs, spill, mix.get("LDL", 0) + mix.get("STL", 0), len(body), weights,
                 {p: round(n / weights, 2) for p, n in sorted(per_pipe.items())}, dict(mix.most_common()),
                 {p: round(v, 1) for p, v in bound.items()}, round(nbytes / HBM_BPS * 1e6, 1))


def profile(name: str, tokens: int, dump: str | None = None, config: str | None = None) -> Stats:
    if name in DEQUANT_CASES:
        return profile_dequant(name, dump)
    kernel, plan, cfg, nbytes = compile_case(name, tokens, config)
    threads = 32 * plan.kwargs["num_warps"]
    # weights one thread covers per loop iteration: the tile (two matrices when gated) over the threads
    weights = cfg.block_n * plan.kwargs["BLOCK_K"] * (2 if plan.gated else 1) // threads
    return analyse(name, tokens, cfg.short(), kernel, weights, plan.n * plan.k * (2 if plan.gated else 1), nbytes, dump)


def profile_dequant(name: str, dump: str | None = None) -> Stats:
    """One expert matrix dequantized to fp16 by the prefill path's kernel (`-bytes`: the
    byte-wise kernel every layout can take; `-words`: the word-wise one)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from runtime.kernels import prefill
    from runtime.kernels.triton_dequant import dequant_kernel, dequant_words_kernel

    shape, spec, words = DEQUANT_CASES[name]
    meta = "*u8" if spec.meta_bits == 8 else "*fp16"
    plane = "*i32" if words else "*u8"
    types = {"out_ptr": "*fp16", "q_ptr": plane, "qh_ptr": "*i16" if words else "*u8", "s_ptr": meta, "z_ptr": meta,
             "sm_ptr": "*fp32", "zm_ptr": "*fp32", "offs_ptr": "*i64"}
    const = dict(MG=spec.meta_group_size, BITS=spec.bits, G=spec.group_size, MB=spec.meta_bits,
                 BLOCK_N=prefill.DEQUANT_BLOCK_N)
    if words:
        fn, const = dequant_words_kernel, const | {"BLOCK_W": prefill.DEQUANT_BLOCK_W, "EVEN": True, "MATS": 1,
                                                   "GROUPED": False}
        per_program = prefill.DEQUANT_BLOCK_N * prefill.DEQUANT_BLOCK_W * (16 if spec.bits in (2, 3) else 32 // spec.bits)
    else:
        fn, const = dequant_kernel, const | {"BLOCK_K": prefill.DEQUANT_BLOCK_K}
        per_program = prefill.DEQUANT_BLOCK_N * prefill.DEQUANT_BLOCK_K
    sig = {a: types.get(a, "constexpr" if a in const else "i32") for a in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=4, enable_fp_fusion=False))
    n_weights = shape[0] * shape[1]
    nbytes = matrix_layout(shape, spec)[1] + 2 * n_weights  # packed read + fp16 written
    return analyse(name, 0, "words" if words else "bytes", kernel, per_program // 128, n_weights, nbytes, dump)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", action="append", choices=sorted(CASES) + sorted(DEQUANT_CASES), help="default: all")
    p.add_argument("--tokens", type=int, action="append", help="default: 1")
    p.add_argument("--config", action="append",
                   help="launch config to profile instead of the heuristic's, e.g. n64w8 (repeatable)")
    p.add_argument("--dump", help="write the SASS of the (last) case here")
    p.add_argument("--mix", action="store_true", help="also print the opcode counts of the loop body")
    p.add_argument("--json", help="write the results as JSON here")
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    rows = [profile(c, t, args.dump, cfg) for c in args.case or list(CASES) + list(DEQUANT_CASES)
            for t in ([0] if c in DEQUANT_CASES else args.tokens or [1]) for cfg in args.config or [None]]
    head = f"{'case':<11}{'T':>3} {'config':<17}{'regs':>5}{'spill':>6}{'local':>6}{'loop':>6}{'w/thr':>6}" \
           f"{'int/w':>7}{'fp/w':>6}{'mem/w':>7}{'int us':>8}{'fp us':>7}{'issue us':>9}{'floor us':>9}"
    print(head)
    print("-" * len(head))
    for s in rows:
        pw, b = s.per_weight, s.bound_us
        print(f"{s.case:<11}{s.tokens:>3} {s.config:<17}{s.registers:>5}{s.spill_bytes:>6}{s.local_ops:>6}{s.loop_instructions:>6}"
              f"{s.weights_per_thread_iteration:>6}{pw.get('int', 0):>7.2f}{pw.get('fp', 0):>6.2f}{pw.get('mem', 0):>7.2f}"
              f"{b.get('int', 0):>8.1f}{b.get('fp', 0):>7.1f}{b['issue']:>9.1f}{s.floor_us:>9.1f}")
        if args.mix:
            print("    " + " ".join(f"{op}:{n}" for op, n in s.mix.items()))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(s) for s in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
