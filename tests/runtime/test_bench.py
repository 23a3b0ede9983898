"""`python -m runtime.bench --tiny` end to end on the CPU, and the fast synthetic writer it uses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from formats.reader import MoepackFile
from runtime.bench import bench_config, bench_recipe, main
from runtime.offload.synthfile import write_bench_file


def test_bench_tiny_end_to_end(tmp_path, capsys):
    out, md = tmp_path / "bench.json", tmp_path / "BENCH.md"
    args = ["--tiny", "--layers", "3", "--slots-per-layer", "2", "--tokens", "3", "--warmup", "1", "--prompt-len", "4",
            "--cache-dir", str(tmp_path / "cache"), "--json", str(out), "--write-md", str(md)]
    assert main(args) == 0
    r = json.loads(out.read_text())
    assert r["layers"] == 3 and r["expert_bits"] == 2 and r["calibrated_h2d_gbps"] > 0
    runs = {(x["routing"], x["variant"]): x for x in r["runs"]}
    assert set(runs) == {(a, b) for a in ("trace", "model") for b in ("naive", "lru", "prefetch")}
    rs = r["record_size"]
    for (routing, variant), x in runs.items():
        s = x["stats"]
        assert x["tokens"] == 3 and x["slots"] == 6 and x["tok_s"] > 0
        assert s["uses"] == 3 * 3 * 2  # decode only: tokens x layers x top-k
        assert s["bytes_copied"] == s["loads"] * rs
        assert x["mb_per_token"] == pytest.approx(s["bytes_copied"] / 3 / 1e6)
        assert x["bound_tok_s"] == pytest.approx(r["calibrated_h2d_gbps"] * 1e9 / (s["bytes_copied"] / 3))
        if variant == "naive":
            assert x["hit_rate"] == 0 and s["loads"] == s["uses"]
        if variant != "prefetch":
            assert s["prefetched"] == 0
    assert runs[("trace", "prefetch")]["stats"]["prefetched"] > 0
    text = md.read_text()
    assert "tiny shapes, 3 layers" in text and "--slots-per-layer 2" in text and "| trace | prefetch |" in text
    assert "| trace | prefetch |" in capsys.readouterr().out
    cached = next((tmp_path / "cache").iterdir())
    mtime = cached.stat().st_mtime_ns
    assert main(args[:-4] + ["--routing", "trace", "--variant", "lru"]) == 0  # reuses the cached file
    assert cached.stat().st_mtime_ns == mtime


def test_bench_times_a_long_prompt_after_decode(tmp_path):
    """--prefill-len: one prompt of that many tokens after each run's decode, with the cache as
    decode left it; its copies are counted apart from decode's (issue #7's 512-token figure)."""
    out = tmp_path / "bench.json"
    args = ["--tiny", "--layers", "2", "--slots-per-layer", "2", "--tokens", "2", "--warmup", "1", "--prompt-len", "3",
            "--prefill-len", "20", "--routing", "trace", "--variant", "naive", "--variant", "lru",
            "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]
    assert main(args) == 0
    r = json.loads(out.read_text())
    rs = r["record_size"]
    for x in r["runs"]:
        pf = x["prefill_stats"]
        assert x["prefill_tok_s"] > 0 and pf["tokens"] == 20 * 2  # 20 tokens through 2 layers
        assert x["prefill_mb"] == pytest.approx(pf["bytes_copied"] / 1e6) and pf["bytes_copied"] == pf["loads"] * rs
        assert pf["loads"] >= 2  # two slots per layer: most of the prompt's experts must come over
        assert x["stats"]["uses"] == 2 * 2 * 2  # decode's statistics exclude the prompt pass
    assert main(args[:-2] + ["--prefill-len", "0"]) == 0  # off: a dash in the table


def test_bench_refuses_a_budget_below_the_minimum(tmp_path, capsys):
    rc = main(["--tiny", "--layers", "2", "--gpu-memory", "64KiB", "--cache-dir", str(tmp_path), "--tokens", "1"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "error: --gpu-memory 64.0KiB is too small" in err
    assert "loaded" not in err  # refused before loading anything
    assert "smallest budget that works" in err and "hint:" in err


def test_bench_simulation(capsys):
    assert main(["--simulate", "--layers", "4", "--tokens", "40", "--json", "-"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    sim = json.loads(lines[-1])["simulation"]
    assert len(sim) == 7 * 4 * 2  # slots per layer (1-7) x (layer, shared, lfu, shared-lfu) x prefetch
    lru = [x["hit_rate"] for x in sim if x["policy"] == "layer" and x["prefetch"] == 0]
    assert lru == sorted(lru) and lru[-1] > lru[0]  # more slots, more hits


@pytest.mark.parametrize("bits", [2, 3])
def test_fast_synthetic_file_is_valid_and_plausible(tmp_path, bits):
    cfg = bench_config(2, tiny=True)
    counts = tuple(tuple(range(1, 9)) for _ in range(2))
    path = write_bench_file(tmp_path / "b.moepack", cfg, bench_recipe(bits), seed=3, expert_counts=counts, progress=False)
    f = MoepackFile(path)
    assert f.verify() == sum(n for _, _, n, _ in f.records())  # every crc32 is honest
    assert f.header.expert_counts == counts
    w = f.expert_arrays(1, 5)
    assert w["w1"].shape == (128, 64) and w["w2"].shape == (64, 128)
    for name, m in w.items():
        target = 1 / np.sqrt(m.shape[1])
        assert abs(m.std() / target - 1) < 0.2 and abs(m.mean()) < 0.2 * target, name
    q = f.tensor_array("model.layers.0.self_attn.q_proj.weight")
    assert abs(q.std() * np.sqrt(64) - 1) < 0.2
    assert np.all(f.tensor_array("model.norm.weight") == 1)
    assert bytes(f.expert_bytes(0, 0)) != bytes(f.expert_bytes(0, 1))  # records differ
    again = write_bench_file(tmp_path / "c.moepack", cfg, bench_recipe(bits), seed=3, expert_counts=counts, progress=False)
    assert again.read_bytes() == path.read_bytes()  # deterministic for a seed


def test_bench_hybrid_variants_pay_their_scratch_out_of_the_budget(tmp_path):
    """In a --gpu-memory budget each hybrid variant has fewer expert slots than lru: its split
    scratch sets come out of the budget, one set more for hybrid-w2; hybrid-only and hybrid-w2
    prefetch no whole experts, and hybrid-w2 reports its staged w2 copies."""
    from runtime.offload.options import hybrid_scratch_bytes

    out = tmp_path / "bench.json"
    args = ["--tiny", "--layers", "2", "--gpu-memory", "520KiB", "--tokens", "3", "--warmup", "1", "--prompt-len", "3",
            "--routing", "trace", "--variant", "lru", "--variant", "hybrid-only", "--variant", "hybrid-w2",
            "--cpu-threads", "1", "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]
    assert main(args) == 0
    r = json.loads(out.read_text())
    runs = {x["variant"]: x for x in r["runs"]}
    file = MoepackFile(next((tmp_path / "cache").iterdir()))
    rs = r["record_size"]
    for v, staged in (("hybrid-only", False), ("hybrid-w2", True)):
        scratch = hybrid_scratch_bytes(file, staged)
        assert runs["lru"]["slots"] - runs[v]["slots"] in (scratch // rs, scratch // rs + 1)
        assert runs[v]["stats"]["prefetched"] == 0
    assert hybrid_scratch_bytes(file, True) > hybrid_scratch_bytes(file, False)
    assert runs["hybrid-w2"]["stats"]["staged_w2"] is not None and runs["hybrid-only"]["stats"]["staged_w2"] is None
    assert runs["hybrid-w2"]["staged_used_per_token"] >= 0


def test_bench_rows_say_which_rounding_each_run_had(tmp_path, auto_activations):
    """On the CPU the default (auto) rounds a plain run's activations to int8 and a hybrid run's to
    int16: each row records its own."""
    if auto_activations is None or not auto_activations.avx2:
        pytest.skip("int8 activations need the compiled kernel's AVX2 build")
    out = tmp_path / "bench.json"
    assert main(["--tiny", "--layers", "2", "--tokens", "2", "--warmup", "1", "--prompt-len", "3", "--routing", "trace",
                 "--variant", "lru", "--variant", "hybrid-only", "--cpu-threads", "1", "--cache-dir",
                 str(tmp_path / "cache"), "--json", str(out)]) == 0
    runs = {x["variant"]: x["cpu_activations"] for x in json.loads(out.read_text())["runs"]}
    assert runs == {"lru": "int8", "hybrid-only": "int16"}
