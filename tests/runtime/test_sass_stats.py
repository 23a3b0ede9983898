"""The fused kernels' machine code stays lean (tools/sass_stats.py, no GPU needed).

A static guard, not a timing: the 2-bit GEMV once spent 5 integer instructions per weight
(the integer pipe bound it at 41 us for w1+w3 on an H100) and the 3-bit one moved 4.9
shared-memory instructions per weight through layout conversions. These tests compile the
kernels for sm_90 in a clean process (the interpreter tests may have replaced the kernel
objects in this one) and check the counts the rework brought them to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def _profile(tmp_path_factory, *args: str, **env: str) -> dict:
    """tools/sass_stats.py's JSON rows for `args` (with `env` set), keyed by case, and by
    (case, tokens) as well."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip("this triton build has no bundled cuobjdump")
    out = tmp_path_factory.mktemp("sass") / "stats.json"
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **env}
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "sass_stats.py"), *args, "--json", str(out)], env=env,
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    if r.returncode and ("backend" in r.stderr.lower() or "ptxas" in r.stderr.lower()):
        pytest.skip(f"triton cannot compile for CUDA here: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads(out.read_text())
    return {**{s["case"]: s for s in rows}, **{(s["case"], s["tokens"]): s for s in rows}}


@pytest.fixture(scope="module")
def stats(tmp_path_factory) -> dict:
    return _profile(tmp_path_factory, "--case", "w13-2", "--case", "w2-3", "--case", "deq-2-words")


def test_two_bit_gemv_costs_about_one_integer_instruction_per_code(stats):
    s = stats["w13-2"]
    assert s["spill_bytes"] == 0 and s["local_ops"] == 0, s["mix"]
    assert s["per_weight"]["int"] <= 2.5, s["mix"]  # 5.1 before the rework
    assert s["mix"].get("LOP3", 0) <= 1.5 * s["weights_per_thread_iteration"]


def test_three_bit_gemv_has_no_shared_memory_round_trips(stats):
    s = stats["w2-3"]
    assert s["per_weight"]["mem"] <= 1.0, s["mix"]  # 4.9 before: the high plane's gather
    assert s["mix"].get("BAR", 0) <= 8


def test_word_wise_dequantize_is_bound_by_memory(stats):
    s = stats["deq-2-words"]
    assert max(s["bound_us"].values()) < s["floor_us"], s["bound_us"]


def test_three_bit_gemv_takes_integer_activations(tmp_path_factory):
    """3-bit w1/w3 on the int16-activation path (the low plane's words with the high bit
    OR-ed in, dp2a): a fifteenth of the float path's float instructions per weight, and no
    thread-local memory at 8 tokens, where the float path had 802 LDL/STL per loop (the H100
    timed that expert at 2.78 ms, 7x the 2-bit one)."""
    st = _profile(tmp_path_factory, "--case", "w13-3", "--tokens", "1", "--tokens", "8")
    one, eight = st[("w13-3", 1)], st[("w13-3", 8)]
    assert one["config"].endswith("-i") and eight["config"].endswith("-i"), (one["config"], eight["config"])
    assert one["per_weight"]["fp"] <= 0.5, one["mix"]  # 4.73 on the float path
    assert one["bound_us"]["issue"] <= 20, one["bound_us"]  # 37.3 on the float path
    assert eight["local_ops"] == 0, eight["mix"]


def test_float_gemv_keeps_eight_tokens_in_registers(tmp_path_factory):
    """With int16 activations off, the float path's gated 3-bit GEMV at 8 tokens takes 256-
    column tiles: at 512 ptxas moved the tokens' products to thread-local memory."""
    s = _profile(tmp_path_factory, "--case", "w13-3", "--tokens", "8", MOEPACK_GEMV_INT="0")["w13-3"]
    assert s["config"].startswith("n8k256") and not s["config"].endswith("-i"), s["config"]
    assert s["local_ops"] == 0, s["mix"]


def test_integer_gemv_loads_in_the_tiles_layout(tmp_path_factory):
    """The int16-activation GEMV loads words, codes and activations in the tile's own 3-D
    layout, with the row length a compile-time constant: no shared-memory conversions in the
    loop (a 2-D load of the words had 24 barriers per iteration) and its integer pipe within
    the memory floor at one token (19.0 us against 12.5 for 4-bit-meta w1+w3 before). At 16
    tokens the gated tile's 4 rows keep it out of thread-local memory (1785 LDL/STL at 8)."""
    st = _profile(tmp_path_factory, "--case", "w13-2m4", "--case", "w2-2m4", "--case", "attn-q-4",
                  "--tokens", "1", "--tokens", "16")
    for case in ("w13-2m4", "w2-2m4", "attn-q-4"):
        s = st[(case, 1)]
        assert s["config"].endswith("-i"), s["config"]
        assert s["mix"].get("BAR", 0) == 0 and s["mix"].get("STS", 0) == 0, (case, s["mix"])
        assert s["bound_us"]["int"] <= 1.2 * s["floor_us"], (case, s["bound_us"], s["floor_us"])
    assert st[("w13-2m4", 16)]["local_ops"] == 0, st[("w13-2m4", 16)]["mix"]


def test_decode_attention_kernels_keep_to_registers(tmp_path_factory):
    """tools/attend_sass.py: the split-key attention's kernels, as compiled for sm_90, spill
    nothing, and the split's scores and P.V run on the tensor cores."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip("this triton build has no bundled cuobjdump")
    out = tmp_path_factory.mktemp("attend") / "attend.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "attend_sass.py"), "--json", str(out)], env=env,
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    kernels = json.loads(out.read_text())["kernels"]
    for name, k in kernels.items():
        assert k["spill_bytes"] == 0, name
    used = next(k for name, k in kernels.items() if "used" in name)
    assert used["hmma"] > 0 and used["registers"] <= 128
