"""`python -m runtime.tune`, which fills the GEMV tuning cache, on the CPU: the problems it
collects from a file, its command line (dry runs, errors), the choice of the fastest config, and
measure_case (result checks, failures, the real kernel under the Triton interpreter). The GPU
and its timer are faked; the shared setup is in tuning_cases.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from formats.header import Recipe
from formats.qtensor import QuantSpec
from formats.reader import MoepackFile
from formats.synthetic import write_synthetic
from runtime import tune
from runtime.dequant import dequantize
from runtime.kernels.configs import GemvConfig, candidate_configs, heuristic_config, pick_gemv_config
from runtime.kernels.qgemv import permute_x
from runtime.kernels.tuning import ensure_loaded
from tests.runtime.test_offload_helpers import tiny_config

from .tuning_cases import (  # noqa: F401 (fake_gpu, isolated: fixtures)
    ATTN, EXPERTS, FP16, GPU, ROOT, TRITON, fake_gpu, isolated, write_tiny)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("tune") / "tiny.moepack")


def test_collect_cases(tiny_file, tmp_path):
    cases = tune.collect_cases(MoepackFile(tiny_file).header, (1, 4))
    got = [(c.uses, c.problem.n, c.problem.k, c.problem.spec, c.problem.tokens, c.problem.gated, c.out_per,
            c.x_follows_config) for c in cases]
    lm = QuantSpec(4, 64, 16)
    assert got == [
        (("q_proj", "o_proj"), 64, 64, ATTN, 1, False, 1, False), (("q_proj", "o_proj"), 64, 64, ATTN, 4, False, 1, False),
        (("k_proj", "v_proj"), 32, 64, ATTN, 1, False, 1, False), (("k_proj", "v_proj"), 32, 64, ATTN, 4, False, 1, False),
        (("lm_head",), 320, 64, lm, 1, False, 1, False), (("lm_head",), 320, 64, lm, 4, False, 1, False),
        # the gated kernel writes h permuted for w2 (16 two-bit codes per word), which reads it so
        (("w1+w3",), 128, 64, EXPERTS, 1, True, 16, False), (("w1+w3",), 128, 64, EXPERTS, 4, True, 16, False),
        (("w2",), 64, 128, EXPERTS, 1, False, 1, True), (("w2",), 64, 128, EXPERTS, 4, False, 1, True),
    ]
    # an fp16 lm_head is a dense matmul: nothing to tune
    plain = tune.collect_cases(MoepackFile(write_tiny(tmp_path / "fp16-head.moepack", FP16)).header, (1,))
    assert [c.uses for c in plain] == [("q_proj", "o_proj"), ("k_proj", "v_proj"), ("w1+w3",), ("w2",)]


def test_collect_cases_times_the_stacked_qkv_the_loader_launches(tmp_path):
    """With 16-bit meta the tiny q, k, v stack (runtime.qlinear.rows_concatenable): the
    decode path launches one q+k+v GEMV and no separate q, k or v."""
    attn = QuantSpec(4, 64, 16)
    recipe = Recipe({"embeddings": FP16, "attention": attn, "norms": FP16, "router": FP16, "experts": EXPERTS,
                     "lm_head": FP16})
    path = write_synthetic(tmp_path / "stacked.moepack", tiny_config(layers=2, experts=4), recipe, seed=0)
    cases = tune.collect_cases(MoepackFile(path).header, (1,))
    assert [(c.uses, c.problem.n, c.problem.k) for c in cases] == [
        (("q+k+v",), 128, 64), (("o_proj",), 64, 64), (("w1+w3",), 128, 64), (("w2",), 64, 128)]


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "runtime.tune", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_dry_run_lists_problems(tiny_file, tmp_path):
    r = run_cli(str(tiny_file), "--dry-run", "--tokens", "1,2", env_extra={"MOEPACK_CACHE_DIR": str(tmp_path / "c")})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"{tiny_file}: 10 distinct GEMV problems")
    rows = [line.split() for line in lines[2:-1]]
    assert len(rows) == 10
    assert [row[:3] for row in rows[:2]] == [["q_proj/o_proj", "64x64", "1"], ["q_proj/o_proj", "64x64", "2"]]
    assert [row[:4] for row in rows[6:8]] == [["w1+w3", "128x64", "gated", "1"], ["w1+w3", "128x64", "gated", "2"]]
    assert {row[0] for row in rows} == {"q_proj/o_proj", "k_proj/v_proj", "lm_head", "w1+w3", "w2"}
    assert lines[-1] == f"cache: {tmp_path / 'c' / 'gemv-tuning.json'}"
    assert not (tmp_path / "c").exists()  # a dry run writes nothing


def test_cli_dry_run_json(tiny_file, capsys):
    assert tune.main([str(tiny_file), "--dry-run", "--json", "--tokens", "8"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(p["uses"], p["tokens"], p["gated"]) for p in doc["problems"]] == [
        (["q_proj", "o_proj"], 8, False), (["k_proj", "v_proj"], 8, False), (["lm_head"], 8, False),
        (["w1+w3"], 8, True), (["w2"], 8, False)]
    w2 = doc["problems"][-1]
    assert w2["candidates"] == len(candidate_configs(64, 128, 8, EXPERTS)) > 5
    assert (w2["bits"], w2["group_size"], w2["meta_bits"], w2["meta_group_size"]) == (2, 16, 8, 128)


def test_cli_without_cuda_is_a_one_line_error(tiny_file, tmp_path):
    r = run_cli(str(tiny_file), env_extra={"CUDA_VISIBLE_DEVICES": "", "MOEPACK_CACHE_DIR": str(tmp_path / "c")})
    assert r.returncode == 1
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("error: runtime.tune needs a CUDA GPU") and lines[1].startswith("hint: ")
    assert "--dry-run" in lines[1]
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("tokens", ["0", "17", "1,x", ","])
def test_cli_rejects_bad_token_counts(tiny_file, capsys, tokens):
    assert tune.main([str(tiny_file), "--dry-run", "--tokens", tokens]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --tokens") and "Traceback" not in err


def test_cli_missing_file(capsys, tmp_path):
    assert tune.main([str(tmp_path / "nope.moepack"), "--dry-run"]) == 1
    assert "no such file" in capsys.readouterr().err


def fake_measure(case: tune.TuneCase, cfgs: list[GemvConfig]) -> list[tune.Timing]:
    """The heuristic at 100 us, the others faster by their position, every third failing;
    everything fails for k/v projections."""
    if case.uses == ("k_proj", "v_proj"):
        return [tune.Timing(c, None, "CompilationError: out of registers") for c in cfgs]
    return [tune.Timing(c, 100.0 - i, None) if i % 3 != 2 else tune.Timing(c, None, "OutOfResources: shared memory")
            for i, c in enumerate(cfgs)]


def test_tune_picks_the_fastest_and_skips_failures(tiny_file):
    cases = tune.collect_cases(MoepackFile(tiny_file).header, (1,))
    results = tune.tune_cases(cases, fake_measure)
    by = {r.case.uses: r for r in results}
    kv = by[("k_proj", "v_proj")]
    assert kv.best is None and kv.speedup is None
    w2 = by[("w2",)]
    n = len(w2.timings)
    fastest = max(i for i in range(n) if i % 3 != 2)
    assert w2.heuristic.config == heuristic_config(64, 128, 1, EXPERTS) and w2.heuristic.us == 100.0
    assert w2.best.config == w2.timings[fastest].config and w2.speedup == pytest.approx(100 / (100 - fastest))
    entries = tune.winners(results)
    assert len(entries) == len(cases) - 1 and all(e.us < 100 for e in entries)
    table = tune.results_table(results, GPU, TRITON, Path("/x/gemv-tuning.json"))
    assert "saved 4 configs to /x/gemv-tuning.json" in table
    assert f"{100 / (100 - fastest):.2f}x" in table
    doc = json.loads(tune.results_json(results, GPU, TRITON, None))
    assert [len(r["failed"]) for r in doc["results"]] == [len(r.timings) // 3 if r.best else len(r.timings) for r in results]
    assert doc["results"][1]["best"] is None and doc["results"][0]["best"]["us"] < 100


def test_cli_tunes_and_the_runtime_loads_the_winners(tiny_file, tmp_path, monkeypatch, capsys, fake_gpu):
    """The whole command with the GPU faked (device, timer and measurement): the winners land
    in --cache and are what ensure_loaded later registers."""
    monkeypatch.setattr(tune, "cuda_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(tune, "device_name", lambda device: GPU)
    monkeypatch.setattr(tune, "triton_version", lambda: TRITON)
    monkeypatch.setattr(tune, "measure_case", lambda case, cfgs, *a, **k: fake_measure(case, cfgs))
    out = tmp_path / "tuned.json"
    assert tune.main([str(tiny_file), "--tokens", "1,2", "--cache", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["cache"] == str(out) and len(doc["results"]) == 10
    monkeypatch.setenv("MOEPACK_CACHE_DIR", str(tmp_path))
    (tmp_path / "tuned.json").rename(tmp_path / "gemv-tuning.json")
    assert ensure_loaded(torch.device("cuda", 0)) == 8
    w2 = next(r for r in doc["results"] if r["problem"]["uses"] == ["w2"] and r["problem"]["tokens"] == 2)
    assert pick_gemv_config(64, 128, 2, EXPERTS) == GemvConfig(**w2["best"]["config"]).for_matrix(128, EXPERTS)


def reference_gemv(x, mats, shape, spec, config, *, x_permuted=False, out_per=1, prepared=None):
    """qgemv.gemv in plain torch (x read as the launch would, result permuted as asked; the
    int16 activations `prepared` from x stand for x itself)."""
    if x_permuted:
        per = 32 // (2 if spec.bits == 3 else spec.bits)
        x = tune.unpermute_x(x, per)
    ys = [F.linear(x.float(), dequantize(c, shape, spec, torch.float32)) for c in mats]
    y = (F.silu(ys[0]) * ys[1] if len(ys) == 2 else ys[0]).to(x.dtype)
    return permute_x(y, out_per) if out_per > 1 else y


def test_measure_case_checks_results_and_survives_failures(tiny_file, monkeypatch):
    cases = {c.uses: c for c in tune.collect_cases(MoepackFile(tiny_file).header, (2,))}
    cfgs = [GemvConfig(block_n=32), GemvConfig(block_n=16, permute_x=False), GemvConfig(block_n=8), GemvConfig(block_n=64)]

    def gemv(x, mats, shape, spec, config, **kw):
        if config.block_n == 8:
            raise RuntimeError("triton.runtime.errors.OutOfResources: out of resource: shared memory\nmore")
        y = reference_gemv(x, mats, shape, spec, config, **kw)
        return y + 1 if config.block_n == 64 else y

    monkeypatch.setattr(tune, "gemv", gemv)
    timer_calls = []

    def timer(fn, calls):
        timer_calls.append(calls)
        fn()
        return 10.0 + len(timer_calls)

    for uses in (("w1+w3",), ("w2",), ("lm_head",)):
        got = tune.measure_case(cases[uses], cfgs, torch.device("cpu"), torch.float32, timer, torch.Generator().manual_seed(0))
        assert [t.config for t in got] == cfgs
        assert got[0].us is not None and got[1].us is not None, got
        assert got[2].us is None and got[2].error == "RuntimeError: triton.runtime.errors.OutOfResources: out of resource: shared memory"
        assert got[3].us is None and got[3].error.startswith("wrong result")
    assert timer_calls == [2] * 6  # two copies rotated on the CPU; failed configs are not timed


def test_int16_w2_configs_are_timed_without_the_quantizing_launch(tiny_file, monkeypatch):
    """w2's int16 activations come from the gated kernel before it: its int configs are timed
    on activations quantized outside the timed call; w1/w3's (x from a norm) and float configs
    are not given any."""
    cases = {c.uses: c for c in tune.collect_cases(MoepackFile(tiny_file).header, (1,))}
    cfgs = [GemvConfig(block_n=16, block_k=128, int_x=True), GemvConfig(block_n=16, block_k=128)]
    seen = []

    def gemv(x, mats, shape, spec, config, prepared=None, **kw):
        seen.append((config.int_x, prepared is not None))
        if prepared is not None:
            assert prepared.dtype == torch.int32 and prepared.shape[0] == x.shape[0]
        return reference_gemv(x, mats, shape, spec, config, **kw)

    monkeypatch.setattr(tune, "gemv", gemv)
    # quantize_x's layout without its Triton launch (no interpreter in this process)
    monkeypatch.setattr(tune, "quantize_x", lambda x, per: torch.zeros(x.shape[0], (per // 2 + 2) * (x.shape[1] // per),
                                                                       dtype=torch.int32))
    for uses, expect in ((("w2",), [(True, True), (False, False)]), (("w1+w3",), [(True, False), (False, False)])):
        seen.clear()
        got = tune.measure_case(cases[uses], cfgs, torch.device("cpu"), torch.float32, lambda fn, n: (fn(), 1.0)[1],
                                torch.Generator().manual_seed(0))
        assert all(t.us is not None for t in got), got
        assert sorted(set(seen), reverse=True) == expect, (uses, seen)


def test_measure_case_runs_the_real_kernel_under_the_interpreter(tiny_file):
    """measure_case with the Triton kernels (interpreted, wall clock) on the w2 problem, whose
    activations arrive in each config's read format: both orders and the int16 activations
    (quantized outside the timed call, as the gated kernel writes them) give the reference."""
    code = (
        "import torch\nfrom formats.reader import MoepackFile\nfrom runtime import tune\n"
        "from runtime.kernels.configs import GemvConfig\nfrom runtime.kernels.timing import wall_clock_timer\n"
        f"case = [c for c in tune.collect_cases(MoepackFile({str(tiny_file)!r}).header, (1,)) if c.uses == ('w2',)][0]\n"
        "cfgs = [GemvConfig(block_n=64, block_k=128), GemvConfig(block_n=64, block_k=64, split_k=2, permute_x=False),"
        " GemvConfig(block_n=64, block_k=128, int_x=True)]\n"
        "assert cfgs[2].for_matrix(case.problem.k, case.problem.spec).int_x\n"
        "got = tune.measure_case(case, cfgs, torch.device('cpu'), torch.float32, wall_clock_timer(),"
        " torch.Generator().manual_seed(0))\n"
        "assert all(t.us is not None and t.us > 0 for t in got), got\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
