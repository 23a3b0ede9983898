"""Building the CPU kernel (runtime/csrc/*.c): compiled at first use with the machine's C
compiler, cached per user under a key of the sources, the compiler and the CPU.

Why a JIT-built C file and not numba or an install-time extension: the kernel's speed comes from
vpmaddwd (16 int16 products summed in pairs per instruction), which numba's LLVM does not emit
from Python loops, and building on the machine that runs it lets `-march=native` pick the
widest vector unit without shipping per-CPU binaries. It needs no Python headers, so it works the
same from a source checkout, an editable install, a wheel, or the GPU host (Triton needs the same
compiler there).

    CC                 the compiler (default: cc, then gcc, then clang)
    MOEPACK_CACHE_DIR  where built libraries go (default ~/.cache/moe-pack)
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "csrc" / "qgemv_cpu.c"
JOBS_SOURCE = SOURCE.with_name("cpu_jobs.c")  # moepack_expert on the library's own thread
DENSE_SOURCE = SOURCE.with_name("dense_cpu.c")  # moepack_dequant, moepack_gemv_f16
DECODE_SOURCE = SOURCE.with_name("decode_cpu.c")  # moepack_decode_step (runtime.cpu_step)
# the fast path's rows for 4 and for 2 tokens: two thirds of the build, so files of their own
PROMPT_SOURCES = (SOURCE.with_name("prompt_cpu.c"), SOURCE.with_name("prompt2_cpu.c"))
SOURCES = (SOURCE, *PROMPT_SOURCES, JOBS_SOURCE, DENSE_SOURCE, DECODE_SOURCE)
# every header beside the sources, so a new one cannot be left out of the build's cache key
HEADERS = tuple(sorted(p.name for p in SOURCE.parent.glob("*.h")))


class NativeBuildError(RuntimeError):
    """The C kernel could not be built or loaded (the caller falls back and says why once)."""


def _cache_dir() -> Path:
    root = os.environ.get("MOEPACK_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "moe-pack"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc.split()[0]):
            return cc
    return None


def _cpu_fingerprint() -> str:
    """-march=native code runs only on this CPU model: the cache key includes its flags."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "|" + "|".join(lines)


def _flag_sets() -> list[list[str]]:
    """Compiler flags to try in order: OpenMP may be missing (macOS clang), -march=native may be
    refused (some non-x86 compilers); the last set always compiles standard C."""
    base = ["-O3", "-std=c11", "-shared", "-fPIC", "-pthread"]
    return [base + ["-march=native", "-fopenmp"], base + ["-march=native"], base + ["-fopenmp"], base]


def build(cc: str | None = None, out_dir: Path | None = None) -> Path:
    """The built library's path, compiling it if this source, compiler and CPU have no build yet."""
    cc = cc or _compiler()
    if cc is None:
        raise NativeBuildError("no C compiler found (set CC, or install gcc/clang)")
    src = b"".join(f.read_bytes() for f in (*SOURCES, *(SOURCE.with_name(h) for h in HEADERS)))
    key = hashlib.sha256(src + cc.encode() + _cpu_fingerprint().encode() + sys.platform.encode()).hexdigest()[:16]
    out_dir = out_dir or _cache_dir() / "cpu-kernels"
    lib = out_dir / f"qgemv_cpu-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    if sys.stderr.isatty():  # ~20 s on 2 cores, once per machine: say why the first run waits
        print(f"moe-pack: compiling the CPU kernel for this CPU (once; cached in {out_dir})", file=sys.stderr, flush=True)
    errors = []
    for flags in _flag_sets():
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            error = _compile(cc, flags, tmp, out_dir)
            if error is None:
                os.replace(tmp, lib)  # atomic: a concurrent build writes the same bytes
                return lib
            errors.append(error)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise NativeBuildError(f"{cc} could not compile {SOURCE.name}: {errors[0]}")


def _compile(cc: str, flags: list[str], lib: str, out_dir: Path, timeout: float = 120) -> str | None:
    """Compile every source to an object at once, one process each, then link them into `lib`.
    qgemv_cpu.c, prompt_cpu.c and prompt2_cpu.c take 6-7 s each on dev-cpu, ~17 s as one file,
    so with three cores or more the build takes the longest of them. None, or the compiler's
    last line of complaint."""
    objects = tempfile.mkdtemp(dir=out_dir)
    procs = []
    try:
        compile_flags = [f for f in flags if f != "-shared"]
        for src in SOURCES:
            obj = os.path.join(objects, src.stem + ".o")
            procs.append((obj, subprocess.Popen(cc.split() + compile_flags + ["-c", "-o", obj, str(src)],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
        deadline = time.monotonic() + timeout
        for _, proc in procs:
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if proc.returncode != 0:
                return (err.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        r = subprocess.run(cc.split() + flags + ["-o", lib, *(obj for obj, _ in procs), "-lm"], capture_output=True,
                           text=True, timeout=timeout)
        return None if r.returncode == 0 else (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(objects, ignore_errors=True)
