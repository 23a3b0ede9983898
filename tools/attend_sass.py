"""Static profile of the decode attention's kernels (kernels/triton_decode.py attend_*), compiled
for sm_90 by the installed triton's ptxas, without a GPU: registers, spills, the loop's
instructions, barriers, tensor-core and memory instructions, shared memory.

    python tools/attend_sass.py [--json out.json]
    PYTHONPATH=.cache/triton-3.6.0 python tools/attend_sass.py   # as the H100 host's triton builds them

Mixtral's heads (32 query heads over 8 kv heads of 128); the integer arguments the JIT marks
divisible by 16 at a real launch (ctx, S) are marked so here, as tools/sass_stats.py does.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sass_stats  # noqa: E402  (tools/, beside this file)


def _compile(fn, types: dict, const: dict, ints: set, warps: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: types.get(n, "constexpr" if n in const else "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a].startswith("*") or a in ints}
    return triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps))


def profile(kernel) -> dict:
    sass, regs, spill = sass_stats._sass(kernel, None)
    ins = sass_stats._instructions(sass)
    body = sass_stats._main_loop(ins) or ins
    mix = collections.Counter(op for _, op, _ in body)

    def count(prefix: str) -> int:
        return sum(n for op, n in mix.items() if op.startswith(prefix))

    return dict(registers=regs, spill_bytes=spill, instructions=len(ins), loop=len(body), barriers=mix.get("BAR", 0),
                hmma=count("HMMA"), lds=count("LDS"), sts=count("STS"), ldg=count("LDG"), shared=kernel.metadata.shared)


def cases() -> dict[str, dict]:
    from runtime.kernels.decode_ops import ATTEND_BLOCK
    from runtime.kernels.triton_decode import attend_combine_kernel, attend_split_kernel

    split_types = {"q_ptr": "*fp16", "cache_ptr": "*fp16", "pos_ptr": "*i64", "ml_ptr": "*fp32", "acc_ptr": "*fp32",
                   "scale": "fp32"}
    out = {}
    for bn in sorted({ATTEND_BLOCK, 64}):
        k = _compile(attend_split_kernel, split_types, dict(R=4, RP=16, D=128, G=8, BN=bn, WINDOW=False),
                     {"ctx"}, 4)
        out[f"split BN{bn}" + (" (used)" if bn == ATTEND_BLOCK else "")] = profile(k)
    combine_types = {"ml_ptr": "*fp32", "acc_ptr": "*fp32", "pos_ptr": "*i64", "out_ptr": "*fp16", "xf_ptr": "*i32"}
    k = _compile(attend_combine_kernel, combine_types, dict(R=4, D=128, G=8, BS=16, BN=ATTEND_BLOCK, WINDOW=False, FMT=2, PER=8),
                 {"S"}, 4)
    out["combine, int16 o input"] = profile(k)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here as well")
    args = ap.parse_args(argv)
    import triton

    rows = cases()
    for name, r in rows.items():
        print(f"{name:24s} " + " ".join(f"{k} {v}" for k, v in r.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(triton=triton.__version__, kernels=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
