"""tools/offload_host.py: it times the engine with the experts' work stubbed, reports its parts,
and puts the real expert functions back afterwards."""

from __future__ import annotations

import json

import runtime.cpu_expert as cpu_expert
import runtime.offload.engine as engine

from .test_offload_helpers import load_tool


def test_offload_host_tool_reports_and_restores(tmp_path):
    real = (engine.expert_ffn, cpu_expert.cpu_expert_ffn, cpu_expert.cpu_expert_hidden)
    tool = load_tool("offload_host")
    out = tmp_path / "h.json"
    assert tool.main(["--variant", "lru", "--variant", "hybrid-w2", "--tokens", "6", "--repeats", "1",
                      "--json", str(out)]) == 0
    assert (engine.expert_ffn, cpu_expert.cpu_expert_ffn, cpu_expert.cpu_expert_hidden) == real
    runs = {r["variant"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"lru", "hybrid-w2"}
    for r in runs.values():
        assert r["engine_us_per_layer"] > 0 and r["parts_us_per_layer"]["plan"] > 0
    # the hybrid variant really splits (its cost model is frozen at the H100's figures)
    assert runs["hybrid-w2"]["split_per_layer"] > 0 and runs["lru"]["split_per_layer"] == 0
    assert "_stage_next" in runs["hybrid-w2"]["parts_us_per_layer"]
