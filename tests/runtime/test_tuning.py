"""The per-GPU tuning cache of GEMV launch configs (runtime/kernels/tuning.py) and the
`python -m runtime.tune` command that fills it, on the CPU: the GPU is faked where the
runtime asks for one, and the timing runs under the Triton interpreter or a fake timer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from formats.errors import MoepackError
from formats.header import Recipe
from formats.qtensor import QuantSpec
from formats.reader import MoepackFile
from formats.synthetic import write_synthetic
from runtime import tune
from runtime.dequant import dequantize
from runtime.kernels import configs, tuning
from runtime.kernels.configs import GemvConfig, GemvProblem, candidate_configs, heuristic_config, pick_gemv_config
from runtime.kernels.qgemv import permute_x
from runtime.kernels.tuning import TunedEntry, TuningCacheWarning, ensure_loaded, load_entries, load_tuned, save_tuned
from tests.runtime.test_offload_helpers import tiny_config

ROOT = Path(__file__).resolve().parents[2]
FP16 = QuantSpec(16)
ATTN, EXPERTS = QuantSpec(4, 64, 8, 256), QuantSpec(2, 16, 8, 128)
GPU, TRITON = "NVIDIA Test GPU", "3.6.0"

W2 = GemvProblem(4096, 14336, EXPERTS, 1)
W13 = GemvProblem(14336, 4096, EXPERTS, 1, gated=True)
KPROJ = GemvProblem(1024, 4096, QuantSpec(4, 64, 16), 2)  # 16-bit meta: meta_group_size 0
ENTRIES = [
    TunedEntry(W2, GemvConfig(block_n=64, block_k=256, split_k=2, num_warps=8), 41.5),
    TunedEntry(W13, GemvConfig(block_n=16, block_k=1024, num_stages=3, permute_x=False), 120.25),
    TunedEntry(KPROJ, GemvConfig(block_n=8, block_k=512, split_k=4, num_warps=2), 9.0),
]


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Every test: the cache in its own folder (never the real home cache), an empty TUNED
    table and no memo of loaded devices."""
    monkeypatch.setenv("MOEPACK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MOEPACK_NO_TUNING", raising=False)
    monkeypatch.setattr(configs, "TUNED", {})
    monkeypatch.setattr(tuning, "_LOADED", {})
    monkeypatch.setattr(tuning, "BUILTIN_PATH", tmp_path / "no-builtin.json")


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache" / "gemv-tuning.json"


def one_warning(fn):
    """fn()'s result; fn must emit exactly one TuningCacheWarning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    ours = [w for w in caught if issubclass(w.category, TuningCacheWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    return out, str(ours[0].message)


# ------------------------------------------------------------------ the file

def test_cache_path_follows_the_environment(monkeypatch, tmp_path):
    assert tuning.cache_path() == tmp_path / "cache" / "gemv-tuning.json"
    monkeypatch.delenv("MOEPACK_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning.cache_path() == tmp_path / "xdg" / "moe-pack" / "gemv-tuning.json"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # the XDG spec: ignored
    assert tuning.cache_path() == tmp_path / "home" / ".cache" / "moe-pack" / "gemv-tuning.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tuning.cache_path() == tmp_path / "home" / ".cache" / "moe-pack" / "gemv-tuning.json"


def test_round_trip(cache):
    assert load_tuned(GPU, TRITON) == {}  # no file yet: an empty cache, no warning
    assert save_tuned(GPU, TRITON, ENTRIES) == cache
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_tuned(GPU, TRITON) == {e.problem: e.config for e in ENTRIES}
        assert sorted(load_entries(GPU, TRITON, cache), key=lambda e: e.us) == sorted(ENTRIES, key=lambda e: e.us)
    doc = json.loads(cache.read_text())
    assert (doc["format"], doc["version"]) == ("moe-pack gemv tuning", 2)
    entry = next(e for e in doc["devices"][0]["entries"] if e["n"] == 1024)
    assert entry == {"n": 1024, "k": 4096, "bits": 4, "group_size": 64, "meta_bits": 16, "meta_group_size": 0,
                     "tokens": 2, "gated": False, "block_n": 8, "block_k": 512, "split_k": 4, "num_warps": 2,
                     "num_stages": 2, "permute_x": True, "int_x": False, "us": 9.0}


def test_version_1_files_read_with_float_activations(cache):
    """Files written before GemvConfig.int_x (version 1, like the built-in H100 table) still
    load: their entries lack the field and mean the float path. A version 2 entry without it
    breaks the schema."""
    save_tuned(GPU, TRITON, ENTRIES)
    edit(cache, lambda d: [d.update(version=1)] + [e.pop("int_x") for e in d["devices"][0]["entries"]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_tuned(GPU, TRITON) == {e.problem: e.config for e in ENTRIES}
    edit(cache, lambda d: d.update(version=2))
    with pytest.warns(TuningCacheWarning, match="lacks int_x"):
        assert load_tuned(GPU, TRITON) == {}


def test_save_merges_other_devices_and_problems(cache):
    save_tuned(GPU, TRITON, ENTRIES[:2])
    save_tuned("Tesla T4", TRITON, ENTRIES[2:])
    faster = TunedEntry(W2, GemvConfig(block_n=32, block_k=512), 30.0)
    save_tuned(GPU, TRITON, [faster, ENTRIES[2]])
    assert load_tuned(GPU, TRITON) == {W2: faster.config, W13: ENTRIES[1].config, KPROJ: ENTRIES[2].config}
    assert load_tuned("Tesla T4", TRITON) == {KPROJ: ENTRIES[2].config}


def test_other_triton_version_or_device_is_ignored(cache):
    save_tuned(GPU, "3.0.0", ENTRIES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not a broken file: just nothing for this pair
        assert load_tuned(GPU, TRITON) == {}
        assert load_tuned("NVIDIA Other GPU", "3.0.0") == {}
    assert len(load_tuned(GPU, "3.0.0")) == 3


def test_save_is_deterministic(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    save_tuned(GPU, TRITON, ENTRIES, a)
    save_tuned("Tesla T4", TRITON, ENTRIES[:1], a)
    save_tuned("Tesla T4", TRITON, ENTRIES[:1], b)
    save_tuned(GPU, TRITON, ENTRIES[::-1], b)
    assert a.read_bytes() == b.read_bytes()
    doc = json.loads(a.read_text())
    assert [d["device"] for d in doc["devices"]] == ["NVIDIA Test GPU", "Tesla T4"]
    assert [e["n"] for e in doc["devices"][0]["entries"]] == [1024, 4096, 14336]


def edit(cache: Path, fn) -> None:
    doc = json.loads(cache.read_text())
    fn(doc)
    cache.write_text(json.dumps(doc))


BROKEN = {
    "not JSON": lambda p: p.write_text("{not json"),
    "truncated": lambda p: p.write_text(p.read_text()[:100]),
    "empty": lambda p: p.write_text(""),
    "binary": lambda p: p.write_bytes(b"\xff\xfe\x00"),
    "a list": lambda p: p.write_text("[]"),
    "NaN time": lambda p: p.write_text(p.read_text().replace('"us": 9.0', '"us": NaN')),
    "repeated key": lambda p: p.write_text(p.read_text().replace('"version": 2', '"version": 2, "version": 2')),
    "other format": lambda p: edit(p, lambda d: d.update(format="something else")),
    "version 3": lambda p: edit(p, lambda d: d.update(version=3)),
    "missing devices": lambda p: edit(p, lambda d: d.pop("devices")),
    "unknown key": lambda p: edit(p, lambda d: d.update(extra=1)),
    "devices not a list": lambda p: edit(p, lambda d: d.update(devices={})),
    "repeated device": lambda p: edit(p, lambda d: d["devices"].append(d["devices"][0])),
    "entry lacks a field": lambda p: edit(p, lambda d: d["devices"][0]["entries"][0].pop("split_k")),
    "entry has an unknown field": lambda p: edit(p, lambda d: d["devices"][0]["entries"][0].update(speed=1)),
    "string for int": lambda p: edit(p, lambda d: d["devices"][0]["entries"][0].update(n="4096")),
    "bool for int": lambda p: edit(p, lambda d: d["devices"][0]["entries"][0].update(num_warps=True)),
    "int for bool": lambda p: edit(p, lambda d: d["devices"][0]["entries"][0].update(gated=1)),
    "float block": lambda p: edit(p, lambda d: d["devices"][0]["entries"][0].update(block_n=64.0)),
    "a folder": lambda p: (p.unlink(), p.mkdir()),
}


@pytest.mark.parametrize("breakage", list(BROKEN))
def test_broken_file_warns_once_and_is_empty(cache, breakage):
    save_tuned(GPU, TRITON, ENTRIES)
    BROKEN[breakage](cache)
    tuned, message = one_warning(lambda: load_tuned(GPU, TRITON))
    assert tuned == {}
    assert str(cache) in message and "delete it or re-run `python -m runtime.tune" in message
    assert "\n" not in message


@pytest.mark.parametrize("field,value", [("block_n", 12), ("block_k", 16), ("split_k", 0), ("num_stages", 9),
                                         ("bits", 5), ("group_size", 12), ("meta_group_size", 0), ("n", 0),
                                         ("tokens", -1), ("us", -3.0)])
def test_invalid_value_drops_the_entry_with_a_warning(cache, field, value):
    save_tuned(GPU, TRITON, ENTRIES[:1])
    edit(cache, lambda d: d["devices"][0]["entries"][0].update({field: value}))
    tuned, message = one_warning(lambda: load_tuned(GPU, TRITON))
    assert tuned == {} and str(cache) in message and "python -m runtime.tune" in message
    # the file's other entries stay usable
    save_tuned("Tesla T4", TRITON, ENTRIES[1:])
    doc = json.loads(cache.read_text())
    t4 = next(b for b in doc["devices"] if b["device"] == "Tesla T4")
    next(e for e in t4["entries"] if e["n"] == W13.n)[field] = value
    cache.write_text(json.dumps(doc))
    tuned, _ = one_warning(lambda: load_tuned("Tesla T4", TRITON))
    assert tuned == {KPROJ: ENTRIES[2].config}


def test_duplicate_problem_is_dropped_with_a_warning(cache):
    save_tuned(GPU, TRITON, ENTRIES[:1])
    edit(cache, lambda d: d["devices"][0]["entries"].append({**d["devices"][0]["entries"][0], "block_n": 8}))
    tuned, message = one_warning(lambda: load_tuned(GPU, TRITON))
    assert tuned == {W2: ENTRIES[0].config} and "twice" in message


def test_write_is_atomic(cache, monkeypatch):
    save_tuned(GPU, TRITON, ENTRIES[:1])
    assert os.listdir(cache.parent) == ["gemv-tuning.json"]  # no temporary file left behind
    before = cache.read_bytes()

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tuning.os, "replace", fail)
    with pytest.raises(MoepackError, match="cannot write the GEMV tuning cache .*No space left"):
        save_tuned(GPU, TRITON, ENTRIES)
    assert cache.read_bytes() == before
    assert os.listdir(cache.parent) == ["gemv-tuning.json"]


def test_save_replaces_a_broken_file(cache):
    cache.parent.mkdir(parents=True)
    cache.write_text("{broken")
    _, message = one_warning(lambda: save_tuned(GPU, TRITON, ENTRIES))
    assert "replacing" in message
    assert len(load_tuned(GPU, TRITON)) == 3


# ------------------------------------------------------------------ the runtime's side

@pytest.fixture
def fake_gpu(monkeypatch):
    """The device-name and triton-version lookups of a pretend CUDA device; counts lookups."""
    calls = []
    monkeypatch.setattr(tuning, "device_name", lambda device: calls.append(device) or GPU)
    monkeypatch.setattr(tuning, "triton_version", lambda: TRITON)
    return calls


def test_ensure_loaded_registers_the_cache_once(cache, fake_gpu):
    save_tuned(GPU, TRITON, ENTRIES)
    save_tuned("Tesla T4", TRITON, [TunedEntry(W2, GemvConfig(block_n=8), 1.0)])
    heuristic = pick_gemv_config(4096, 14336, 1, EXPERTS)
    dev = torch.device("cuda", 0)
    assert ensure_loaded(dev) == 3
    assert pick_gemv_config(4096, 14336, 1, EXPERTS) == ENTRIES[0].config.for_matrix(14336, EXPERTS) != heuristic
    assert pick_gemv_config(14336, 4096, 1, EXPERTS, gated=True) == ENTRIES[1].config.for_matrix(4096, EXPERTS)
    # keyed by meta_group_size too: the same shape with other meta groups keeps the heuristic
    other = QuantSpec(2, 16, 8, 256)
    assert pick_gemv_config(4096, 14336, 1, other) == heuristic_config(4096, 14336, 1, other)
    cache.unlink()
    assert ensure_loaded(dev) == 3 and fake_gpu == [dev]  # memoized: the file is not read again
    assert configs.TUNED.keys() == {e.problem.key for e in ENTRIES}


def test_ensure_loaded_is_a_noop_on_the_cpu(cache, fake_gpu):
    save_tuned(GPU, TRITON, ENTRIES)
    assert ensure_loaded(torch.device("cpu")) == 0
    assert configs.TUNED == {} and fake_gpu == []


def test_ensure_loaded_on_the_cpu_does_not_import_triton(tmp_path):
    code = ("import sys, torch\nfrom runtime.kernels import tuning\n"
            "assert tuning.ensure_loaded(torch.device('cpu')) == 0\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n")
    env = {**os.environ, "MOEPACK_CACHE_DIR": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("value,loaded", [("1", 0), ("yes", 0), ("0", 3), ("", 3)])
def test_no_tuning_env(cache, fake_gpu, monkeypatch, value, loaded):
    save_tuned(GPU, TRITON, ENTRIES)
    monkeypatch.setenv("MOEPACK_NO_TUNING", value)
    assert ensure_loaded(torch.device("cuda", 0)) == loaded
    assert len(configs.TUNED) == loaded


def test_ensure_loaded_survives_a_broken_cache(cache, fake_gpu):
    cache.parent.mkdir(parents=True)
    cache.write_text('{"format": "moe-pack gemv tuning", "version": 1}')
    n, message = one_warning(lambda: ensure_loaded(torch.device("cuda", 0)))
    assert n == 0 and configs.TUNED == {} and "lacks devices" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ensure_loaded(torch.device("cuda", 0)) == 0  # warned once per process


def test_candidates_start_from_the_heuristic_whatever_is_tuned():
    before = candidate_configs(4096, 14336, 1, EXPERTS)
    configs.register_config(4096, 14336, 1, EXPERTS, False, GemvConfig(block_n=8, block_k=64, split_k=3))
    assert candidate_configs(4096, 14336, 1, EXPERTS) == before
    assert before[0] == heuristic_config(4096, 14336, 1, EXPERTS)
    # on a smaller GPU the heuristic splits K more, and the candidates follow it
    assert candidate_configs(4096, 14336, 1, EXPERTS, sm_count=40)[0] == heuristic_config(4096, 14336, 1, EXPERTS, sm_count=40)


def test_launch_plan_loads_the_cache_for_cuda_activations(cache, fake_gpu, monkeypatch):
    """qgemv.launch_plan asks ensure_loaded for the activations' device (CUDA only) before it
    picks a config: the tuned entry wins without any explicit call."""
    from runtime.kernels import qgemv

    save_tuned(GPU, TRITON, ENTRIES)
    seen = []
    monkeypatch.setattr(qgemv, "ensure_loaded", lambda device: seen.append(device) or ensure_loaded(device))
    monkeypatch.setattr(qgemv, "sm_count", lambda device: 132)  # no CUDA here to ask
    x = torch.zeros(1, 14336)
    qgemv.launch_plan(x, (4096, 14336), EXPERTS, False)
    assert seen == [] and configs.TUNED == {}  # CPU activations: nothing loaded

    class CudaLike:  # launch_plan reads only these of x
        is_cuda, device, shape = True, torch.device("cuda", 0), (1, 14336)

    plan = qgemv.launch_plan(CudaLike(), (4096, 14336), EXPERTS, False)
    want = ENTRIES[0].config.for_matrix(14336, EXPERTS)
    assert seen == [torch.device("cuda", 0)] and plan.kwargs["BLOCK_N"] == want.block_n
    assert plan.grid[1] == -(-14336 // (plan.kwargs["TILES"] * want.block_k))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_load_model_registers_this_gpus_cache(cache, tmp_path):
    from runtime.kernels.tuning import device_name, triton_version
    from runtime.loader import load_model

    path = write_tiny(tmp_path / "m.moepack")
    save_tuned(device_name(torch.device("cuda")), triton_version(), ENTRIES)
    load_model(path, torch.device("cuda"), torch.float16)
    assert configs.TUNED.keys() == {e.problem.key for e in ENTRIES}


# ------------------------------------------------------------------ runtime.tune

def write_tiny(path: Path, lm_head: QuantSpec = QuantSpec(4, 64, 16)) -> Path:
    recipe = Recipe({"embeddings": FP16, "attention": ATTN, "norms": FP16, "router": FP16, "experts": EXPERTS,
                     "lm_head": lm_head})
    return write_synthetic(path, tiny_config(layers=2, experts=4), recipe, seed=0)


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


def reference_gemv(x, mats, shape, spec, config, *, x_permuted=False, out_per=1):
    """qgemv.gemv in plain torch (x read as the launch would, result permuted as asked)."""
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


def test_measure_case_runs_the_real_kernel_under_the_interpreter(tiny_file):
    """measure_case with the Triton kernels (interpreted, wall clock) on the w2 problem, whose
    activations arrive in each config's read order: both orders give the reference result."""
    code = (
        "import torch\nfrom formats.reader import MoepackFile\nfrom runtime import tune\n"
        "from runtime.kernels.configs import GemvConfig\nfrom runtime.kernels.timing import wall_clock_timer\n"
        f"case = [c for c in tune.collect_cases(MoepackFile({str(tiny_file)!r}).header, (1,)) if c.uses == ('w2',)][0]\n"
        "cfgs = [GemvConfig(block_n=64, block_k=128), GemvConfig(block_n=64, block_k=64, split_k=2, permute_x=False)]\n"
        "got = tune.measure_case(case, cfgs, torch.device('cpu'), torch.float32, wall_clock_timer(),"
        " torch.Generator().manual_seed(0))\n"
        "assert all(t.us is not None and t.us > 0 for t in got), got\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# ------------------------------------------------------------------ built-in measurements

H100 = "NVIDIA H100 80GB HBM3"


def test_builtin_configs_are_valid_and_cover_mixtral_decode(monkeypatch):
    """The shipped file parses without a warning, and holds the T=1 problems of a Mixtral
    layer (both gated expert GEMVs and w2 at 2 and 3 bits, q/o and k/v) for the GPU it was
    measured on."""
    monkeypatch.setattr(tuning, "BUILTIN_PATH", Path(tuning.__file__).resolve().parent / "data" / "gemv-tuning-builtin.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tuned = tuning.tuned_for(H100, "3.6.0")
    shapes = {(p.n, p.k, p.spec.bits, p.gated, p.tokens) for p in tuned}
    assert {(14336, 4096, 2, True, 1), (4096, 14336, 2, False, 1), (14336, 4096, 3, True, 1),
            (4096, 14336, 3, False, 1), (4096, 4096, 4, False, 1), (1024, 4096, 4, False, 1)} <= shapes
    assert tuning.tuned_for(H100, "3.0.0") == {}  # measured under one triton: not used under another


def test_user_cache_overrides_the_builtin(cache, tmp_path, monkeypatch):
    builtin = tmp_path / "builtin.json"
    monkeypatch.setenv("MOEPACK_CACHE_DIR", str(tmp_path / "b"))
    save_tuned(GPU, TRITON, ENTRIES)  # into tmp_path/b: becomes the built-in file below
    (tmp_path / "b" / "gemv-tuning.json").rename(builtin)
    monkeypatch.setattr(tuning, "BUILTIN_PATH", builtin)
    monkeypatch.setenv("MOEPACK_CACHE_DIR", str(cache.parent))
    assert tuning.tuned_for(GPU, TRITON) == {e.problem: e.config for e in ENTRIES}  # no user cache
    mine = TunedEntry(W2, GemvConfig(block_n=8, split_k=8), 1.0)
    save_tuned(GPU, TRITON, [mine])
    tuned = tuning.tuned_for(GPU, TRITON)
    assert tuned[W2] == mine.config and tuned[W13] == ENTRIES[1].config and len(tuned) == 3
