"""The runtime reads the format alone: no quantizer, no hqq, no transformers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_runtime_imports_no_quantizer():
    code = (
        "import sys, runtime.generate, runtime.loader, runtime.baseline_bench, runtime.experts, runtime.dequant\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('quantize', 'hqq', 'transformers', 'safetensors'))\n"
        "print(','.join(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""
