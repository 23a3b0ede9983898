"""tools/hybrid_projection.py: the copy-or-compute projection runs on the engine's own cost
model and cache; a CPU that cannot help changes nothing, and at 12 GiB the split pays."""

from __future__ import annotations

import json

from .test_offload_helpers import load_tool


def _tool():
    return load_tool("hybrid_projection")


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
            assert r["w2_tok_s"] > 0 and r["w2_per_token"]["staged_splits"] <= r["w2_per_token"]["split"]
    r12 = next(r for r in rows if r["budget"] == "12GiB" and r["cpu_ms"] is not None)
    assert r12["w13_tok_s"] > r12["whole_tok_s"]  # at 1.2 ms the split pays (45.8 vs 36.4 over 300 tokens)
    assert r12["rows_tok_s"] > r12["w13_tok_s"]
    assert r12["w2_per_token"]["staged_splits"] > 0
    assert "12GiB" in capsys.readouterr().out


def test_a_hopeless_cpu_changes_nothing():
    tool = _tool()
    record = 67_436_544
    t_copy = record / 54.3e9
    copy = tool.project(149, "lfu", t_copy, None, 0.16e-3, 30, 0, record)
    slow = tool.project(149, "lfu", t_copy, 1.0, 0.16e-3, 30, 0, record)  # a second per CPU expert
    assert abs(slow["w13_tok_s"] - copy["whole_tok_s"]) < 1e-9
    assert abs(slow["rows_tok_s"] - copy["whole_tok_s"]) < 1e-9
    # nothing staged (nothing would be split): only the spare scratch set's slot is lost
    assert slow["w2_per_token"]["staged_splits"] == 0
    assert abs(slow["w2_tok_s"] - tool.project(148, "lfu", t_copy, None, 0.16e-3, 30, 0, record)["whole_tok_s"]) < 1e-9
    assert slow["w13_per_token"]["split"] == slow["w13_per_token"]["cpu"] == 0


def test_4bit_meta_experts_are_smaller_and_get_more_slots():
    tool = _tool()
    (b8, s8), (b4, s4) = tool.geometry(8), tool.geometry(4)
    assert (b8, b4) == (67_436_544, 56_426_496)
    assert all(s4[k] > s8[k] for k in s8) and s8["12GiB"] == 150 and s4["12GiB"] == 180


def test_staged_w2_pays_where_a_layer_leaves_the_link_slack():
    """12 GiB, 4-bit meta, a 1.0 ms CPU expert: with g = 0.27 ms per layer of link slack the
    staged w2 of the next layer's guess pays, its scratch set's slot included (rows 59.0, w2
    62.7 tok/s over 300 tokens); with almost none (g = 0.02 ms) the staging copy mostly spills
    into the next layer's copies."""
    tool = _tool()
    record, slots = tool.geometry(4)
    t_copy = record / 54.3e9
    slack = tool.project(slots["12GiB"], "lfu", t_copy, 1.0e-3, 0.27e-3, 60, 0, record)
    assert slack["w2_tok_s"] > 1.03 * slack["rows_tok_s"]
    assert slack["w2_per_token"]["staged_splits"] > 0.5 * slack["w2_per_token"]["split"]
    tight = tool.project(slots["12GiB"], "lfu", t_copy, 1.0e-3, 0.02e-3, 60, 0, record)
    assert tight["w2_tok_s"] / tight["rows_tok_s"] < slack["w2_tok_s"] / slack["rows_tok_s"]
