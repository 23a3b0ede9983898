"""tools/hybrid_projection.py: the copy-or-compute projection runs on the engine's own cost
model and cache; a CPU that cannot help changes nothing, and at 12 GiB the split pays."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "hybrid_projection.py"


def _tool():
    spec = importlib.util.spec_from_file_location("hybrid_projection", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_projection_runs_and_orders_the_modes(tmp_path, capsys):
    tool = _tool()
    out = tmp_path / "p.json"
    assert tool.main(["--tokens", "40", "--policy", "lfu", "--cpu-ms", "1.2", "--gpu-layer-ms", "0.16",
                      "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["budget"] for r in rows} == {"8GiB", "12GiB", "16GiB"}
    for r in rows:
        if r["cpu_ms"] is None:  # copy only: one mode, nothing on the CPU
            assert r["whole_per_token"]["cpu"] == r["whole_per_token"]["split"] == 0
        else:
            assert min(r["ideal_tok_s"], r["rows_tok_s"], r["w13_tok_s"], r["whole_tok_s"]) > 0
            # balancing the rows (and choosing copies knowing it) does not lose at these settings
            assert r["rows_tok_s"] >= r["w13_tok_s"] - 1e-9
    r12 = next(r for r in rows if r["budget"] == "12GiB" and r["cpu_ms"] is not None)
    assert r12["w13_tok_s"] > r12["whole_tok_s"]  # at 1.2 ms the split pays (45.8 vs 36.4 over 300 tokens)
    assert r12["rows_tok_s"] > r12["w13_tok_s"]
    assert "12GiB" in capsys.readouterr().out


def test_a_hopeless_cpu_changes_nothing():
    tool = _tool()
    record = 67_436_544
    t_copy = record / 54.3e9
    copy = tool.project(149, "lfu", t_copy, None, 0.16e-3, 30, 0, record)
    slow = tool.project(149, "lfu", t_copy, 1.0, 0.16e-3, 30, 0, record)  # a second per CPU expert
    assert abs(slow["w13_tok_s"] - copy["whole_tok_s"]) < 1e-9
    assert abs(slow["rows_tok_s"] - copy["whole_tok_s"]) < 1e-9
    assert slow["w13_per_token"]["split"] == slow["w13_per_token"]["cpu"] == 0


def test_4bit_meta_experts_are_smaller_and_get_more_slots():
    tool = _tool()
    (b8, s8), (b4, s4) = tool.geometry(8), tool.geometry(4)
    assert (b8, b4) == (67_436_544, 56_426_496)
    assert all(s4[k] > s8[k] for k in s8) and s8["12GiB"] == 147 and s4["12GiB"] == 175
