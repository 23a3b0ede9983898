"""The C measurement tools in tools/ that need no library (docs/BENCHMARKS.md sections 23 and
26 quote them) still compile against the kernel's current sources and run. They are not part
of the package, so nothing else would notice an edit to runtime/csrc/ that breaks them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from runtime import cpu_build

ROOT = Path(__file__).resolve().parent.parent


def _build(tmp_path: Path, source: str, *extra: str) -> Path:
    cc = cpu_build._compiler()
    if cc is None:
        pytest.skip("no C compiler")
    out = tmp_path / Path(source).stem
    for flags in ([*extra], []):  # the kernel builds without OpenMP too (cpu_build._flag_sets)
        r = subprocess.run(cc.split() + ["-O2", "-march=native", *flags, str(ROOT / source), "-o", str(out), "-lm"],
                           capture_output=True, text=True, timeout=300)
        if r.returncode == 0:
            return out
    raise AssertionError(f"{source} does not compile: {r.stderr[-2000:]}")


def _needs_avx2() -> None:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if not re.search(r"\bavx2\b", flags) or not re.search(r"\bfma\b", flags):
        pytest.skip("the tools' vector code needs AVX2 and FMA")


def test_cpu_kernel_cycles_builds_and_times_a_matrix(tmp_path):
    _needs_avx2()
    exe = _build(tmp_path, "tools/cpu_kernel_cycles.c", "-fopenmp")
    r = subprocess.run([str(exe), "2", "16", "64", "3.2", "4"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert re.search(r"2-bit g16, 4-bit meta, 64 x 4096, .* cycles per 128 weights", r.stdout), r.stdout


def test_cpu_dot_probe_builds_and_times_both_dots(tmp_path):
    _needs_avx2()
    exe = _build(tmp_path, "tools/cpu_dot_probe.c")
    r = subprocess.run([str(exe), "16"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = re.findall(r"int16 ([\d.]+), int8 ([\d.]+) cycles per 128 weights", r.stdout)
    assert len(rows) == 3 and all(float(a) > 0 and float(b) > 0 for a, b in rows), r.stdout
