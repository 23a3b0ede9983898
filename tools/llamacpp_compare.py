"""moe-pack's CPU path against llama.cpp's on the same cores: one expert, then the whole model.

    python tools/llamacpp_compare.py --json OUT.json [--threads 16 --threads 8] [--layers 32]

Builds llama.cpp's llama-bench and the two ggml tools with tools/llamacpp_host.sh (from the files
in --dir, carried to a machine without cmake or llama.cpp), unless --build already holds them,
then times:
1. one Mixtral-8x7B expert at batch 1 at each --threads count: ggml's Q2_K and Q3_K
   (tools/ggml_expert_bench.c) and moe-pack's 2-bit and 3-bit experts (tools/cpu_expert_bench.py,
   which runs 1, 2, 4, 8, 16 ... threads itself) with int16 activations, then int8;
2. --layers Mixtral-shape layers CPU-only at the first --threads count: llama-bench (a 128-token
   prompt; decode at depth 0 and 128) on a GGUF at moe-pack's bits (tools/ggml_mixtral_gguf.c
   --mix matched), and runtime.baseline_bench --device cpu --recipe 4/2m4 after a 16- and a
   128-token prompt with int16 activations, and after a 128-token prompt with int8.
docs/BENCHMARKS.md sections 27 and 28 have the same comparison on dev-cpu's 2 cores. Writes every tool's
raw output into the JSON after each run, so that a run cut short keeps what it measured; prints
one line per figure.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
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


def build(src_dir: Path, build_dir: Path) -> str | None:
    """None once the binaries are in build_dir, else why the build failed. Missing sources raise:
    nothing has run yet, so the caller stops before spending the host's time."""
    if all((build_dir / b).exists() for b in BINARIES):
        return None
    for pattern in ("llama.cpp-src.tgz", "cmake-*.whl", "ninja-*.whl"):
        if not any(src_dir.glob(pattern)):
            raise RuntimeError(f"{src_dir / pattern} is missing: prepare --dir as tools/llamacpp_host.sh's header says")
    env = {**os.environ, "DIR": str(src_dir.resolve()), "BUILD": str(build_dir.resolve()), "PY": sys.executable}
    try:
        _run(["bash", "tools/llamacpp_host.sh"], env=env, timeout=1200)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None


def expert_rows(build_dir: Path | None, threads: list[int], runs: int, out: dict, save) -> None:
    """Expert figures into out, saved (save()) after every run; build_dir None: moe-pack's only."""
    with tempfile.TemporaryDirectory() as tmp:
        ggml_json, ours_json = Path(tmp) / "ggml.json", Path(tmp) / "ours.json"
        if build_dir is not None:
            _run([str(build_dir / "ggml_expert_bench"), "--type", "q2_K,q3_K", "--threads",
                  ",".join(map(str, threads)), "--runs", str(runs), "--repack", "--json", str(ggml_json)])
            out["ggml"] = json.loads(ggml_json.read_text())
            save()
        for act, key in (("int16", "moepack"), ("int8", "moepack_int8")):
            _run([sys.executable, "tools/cpu_expert_bench.py", "--runs", str(runs), "--cpu-activations", act, "--json",
                  str(ours_json)])
            out[key] = json.loads(ours_json.read_text())
            save()


def model_rows(build_dir: Path | None, threads: int, layers: int, workdir: Path, save) -> dict:
    """Whole-model figures into out, saved (save()) after every run; build_dir None: moe-pack's only."""
    out: dict = {"threads": threads, "llama_cpp": [], "moepack": []}
    gguf = workdir / f"mixtral-L{layers}-matched.gguf"
    try:
        if build_dir is not None:
            _run([str(build_dir / "ggml_mixtral_gguf"), str(gguf), "--layers", str(layers), "--mix", "matched"])
            for args in (["-p", "128", "-n", "0"], ["-p", "0", "-n", "16", "-d", "0,128"]):
                raw = _run([str(build_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), *args, "-r", "3",
                            "-o", "json"])
                out["llama_cpp"] += json.loads(raw)
                save(out)
    finally:
        gguf.unlink(missing_ok=True)
    for prompt, act in ((16, "int16"), (128, "int16"), (128, "int8")):
        raw = _run([sys.executable, "-m", "runtime.baseline_bench", "--device", "cpu", "--layers", str(layers),
                    "--recipe", "4/2m4", "--prompt-len", str(prompt), "--new-tokens", "16", "--workdir",
                    str(workdir), "--cpu-activations", act], env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                   timeout=1200)
        out["moepack"].append(json.loads(raw.splitlines()[0]))
        save(out)
    return out


def _clean(workdir: Path) -> None:
    """What a run cut short by a timeout left in workdir (16 GB each at 32 layers)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for p in workdir.glob("mixtral-L*-matched.gguf"):
        p.unlink()
    for p in workdir.glob("tmp*"):  # runtime.baseline_bench's temporary folders
        shutil.rmtree(p, ignore_errors=True)


def summary(result: dict) -> list[str]:
    lines = []
    experts = result.get("experts", {})
    for row in experts.get("ggml", {}).get("rows", []):
        lines.append(f"ggml expert {row['type']} {row['threads']} threads: {row['median_ms']:.2f} ms")
    for key, act in (("moepack", "int16"), ("moepack_int8", "int8")):
        for row in experts.get(key, {}).get("rows", []):
            if row["tokens"] == 1 and row["threads"] in result.get("threads", []):
                lines.append(f"moe-pack expert {row['expert']} {row['threads']} threads, {act}: {row['ms']:.2f} ms")
    model = result.get("model", {})
    t = model.get("threads")
    for r in model.get("llama_cpp", []):
        kind = (f"{r['n_prompt']}-token prompt" if r["n_prompt"] else "decode") + f" at depth {r['n_depth']}"
        lines.append(f"llama.cpp {t} threads, {kind}: {r['avg_ts']:.2f} tok/s")
    for r in model.get("moepack", []):
        lines.append(f"moe-pack {t} threads, {r.get('cpu_activations', 'int16')}, after a {r['prefill_tokens']}-token prompt: decode "
                     f"{r['decode_tok_s']:.2f} tok/s, prompt {r['prefill_tok_s']:.2f} tok/s")
    return lines


def _terminated(signum, frame):
    # timeout(1) sends SIGTERM: exit through the finally blocks, which delete the 16 GB files
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, required=True, help="write every raw result here")
    ap.add_argument("--threads", type=int, action="append",
                    help="thread counts of the expert runs, the first also the whole model's (default: all cores)")
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
    # the tools run from the repository root: paths given relative to the caller's folder
    for name in ("dir", "build", "workdir", "json"):
        setattr(args, name, getattr(args, name).resolve())
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
    def save(model: dict | None = None) -> None:
        if model is not None:
            result["model"] = model
        args.json.write_text(json.dumps(result, indent=1))

    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        failed = build(args.dir, args.build)
        if failed is not None:  # moe-pack's rows need no llama.cpp: the call still yields them
            print(f"llamacpp_compare: llama.cpp not built, moe-pack's rows only: {failed}", file=sys.stderr)
            result["llama_cpp_error"] = failed
        llama = args.build if failed is None else None
        _clean(args.workdir)
        result["experts"] = {}
        expert_rows(llama, threads, args.runs, result["experts"], save)
        if not args.skip_model:
            model_rows(llama, threads[0], args.layers, args.workdir, save)
    finally:
        # a child killed by timeout's SIGTERM leaves its 16 GB file behind; later stages need the disk
        _clean(args.workdir)
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
