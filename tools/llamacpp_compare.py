"""moe-pack's CPU path against llama.cpp's on the same cores: one expert, then the whole model.

    python tools/llamacpp_compare.py --json OUT.json [--threads 16 --threads 8] [--layers 32]

Builds llama.cpp's llama-bench and the two ggml tools with tools/llamacpp_host.sh (from the files
in --dir, carried to a machine without cmake or llama.cpp), unless --build already holds them,
then times, at each thread count:
1. one Mixtral-8x7B expert at batch 1: ggml's Q2_K and Q3_K (tools/ggml_expert_bench.c) and
   moe-pack's 2-bit and 3-bit experts (tools/cpu_expert_bench.py);
2. --layers Mixtral-shape layers CPU-only: llama-bench (-p 128 -n 16, depth 0 and 128) on a GGUF
   at moe-pack's bits (tools/ggml_mixtral_gguf.c --mix matched), and runtime.baseline_bench
   --device cpu --recipe 4/2m4 after a 16- and a 128-token prompt.
docs/BENCHMARKS.md section 27 has the same comparison on dev-cpu's 2 cores. Writes every tool's
raw output into the JSON; prints one line per figure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BINARIES = ("llama-bench", "ggml_expert_bench", "ggml_mixtral_gguf")


def _run(cmd: list[str], env: dict | None = None, timeout: int = 900) -> str:
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def build(src_dir: Path, build_dir: Path) -> None:
    if all((build_dir / b).exists() for b in BINARIES):
        return
    for pattern in ("llama.cpp-src.tgz", "cmake-*.whl", "ninja-*.whl"):
        if not any(src_dir.glob(pattern)):
            raise RuntimeError(f"{src_dir / pattern} is missing: prepare --dir as tools/llamacpp_host.sh's header says")
    _run(["bash", "tools/llamacpp_host.sh"], env={**os.environ, "DIR": str(src_dir), "BUILD": str(build_dir)},
         timeout=1200)


def _threads_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


def expert_rows(build_dir: Path, threads: list[int], runs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ggml_json, ours_json = Path(tmp) / "ggml.json", Path(tmp) / "ours.json"
        _run([str(build_dir / "ggml_expert_bench"), "--type", "q2_K,q3_K", "--threads", ",".join(map(str, threads)),
              "--runs", str(runs), "--repack", "--json", str(ggml_json)])
        ours = {}
        for t in threads:  # cpu_expert_bench runs at 1 thread and at all of them: one call per count
            _run([sys.executable, "tools/cpu_expert_bench.py", "--runs", str(runs), "--json", str(ours_json)],
                 env=_threads_env(t))
            ours[str(t)] = json.loads(ours_json.read_text())
        return {"ggml": json.loads(ggml_json.read_text()), "moepack": ours}


def model_rows(build_dir: Path, threads: list[int], layers: int, workdir: Path) -> dict:
    out: dict = {"llama_cpp": {}, "moepack": {}}
    workdir.mkdir(parents=True, exist_ok=True)
    gguf = workdir / f"mixtral-L{layers}-matched.gguf"
    try:
        _run([str(build_dir / "ggml_mixtral_gguf"), str(gguf), "--layers", str(layers), "--mix", "matched"])
        for t in threads:
            raw = _run([str(build_dir / "llama-bench"), "-m", str(gguf), "-t", str(t), "-p", "0,128", "-n", "16",
                        "-d", "0,128", "-r", "3", "-o", "json"])
            out["llama_cpp"][str(t)] = json.loads(raw)
    finally:
        gguf.unlink(missing_ok=True)
    for t in threads:
        rows = []
        for prompt in (16, 128):
            raw = _run([sys.executable, "-m", "runtime.baseline_bench", "--device", "cpu", "--layers", str(layers),
                        "--recipe", "4/2m4", "--prompt-len", str(prompt), "--new-tokens", "16", "--workdir",
                        str(workdir)], env=_threads_env(t), timeout=1200)
            rows.append(json.loads(raw.splitlines()[0]))
        out["moepack"][str(t)] = rows
    return out


def summary(result: dict) -> list[str]:
    lines = []
    for row in result.get("experts", {}).get("ggml", {}).get("rows", []):
        lines.append(f"ggml expert {row['type']} {row['threads']} threads: {row['median_ms']:.2f} ms")
    for t, res in result.get("experts", {}).get("moepack", {}).items():
        for row in res["rows"]:
            if row["tokens"] == 1 and str(row["threads"]) == t:
                lines.append(f"moe-pack expert {row['expert']} {t} threads: {row['ms']:.2f} ms")
    for t, rows in result.get("model", {}).get("llama_cpp", {}).items():
        for r in rows:
            kind = (f"{r['n_prompt']}-token prompt" if r["n_prompt"] else "decode") + f" at depth {r['n_depth']}"
            lines.append(f"llama.cpp {t} threads, {kind}: {r['avg_ts']:.2f} tok/s")
    for t, rows in result.get("model", {}).get("moepack", {}).items():
        for r in rows:
            lines.append(f"moe-pack {t} threads, after {r['prefill_tokens']} prompt tokens: decode "
                         f"{r['decode_tok_s']:.2f} tok/s, prompt {r['prefill_tok_s']:.2f} tok/s")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, required=True, help="write every raw result here")
    ap.add_argument("--threads", type=int, action="append", help="thread counts (default: all cores)")
    ap.add_argument("--layers", type=int, default=32, help="layers of the whole-model runs (default 32)")
    ap.add_argument("--runs", type=int, default=20, help="timed calls per expert case (default 20)")
    ap.add_argument("--dir", type=Path, default=ROOT / ".cache" / "llamacpp",
                    help="llama.cpp's sources and the cmake/ninja wheels (tools/llamacpp_host.sh)")
    ap.add_argument("--build", type=Path, default=Path("/tmp/llamacpp-build"), help="where the binaries go")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/llamacpp-compare"),
                    help="for the GGUF and moe-pack's file (~16 GB each at 32 layers, one at a time)")
    ap.add_argument("--skip-model", action="store_true", help="only the expert comparison")
    args = ap.parse_args(argv)
    threads = args.threads or [os.cpu_count() or 1]
    if args.layers < 1 or any(t < 1 for t in threads):
        ap.error("--layers and --threads must be at least 1")
    result: dict = {"threads": threads, "layers": args.layers}
    try:
        _compare(args, threads, result)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"llamacpp_compare: {e}", file=sys.stderr)
        return 1
    print("\n".join(summary(result)))
    return 0


def _compare(args, threads: list[int], result: dict) -> None:
    build(args.dir, args.build)
    result["experts"] = expert_rows(args.build, threads, args.runs)
    args.json.write_text(json.dumps(result, indent=1))  # the expert figures survive a later timeout
    if not args.skip_model:
        result["model"] = model_rows(args.build, threads, args.layers, args.workdir)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
