"""The per-GPU tuning cache of GEMV launch configs (runtime/kernels/tuning.py) on the CPU: its
file (round trip, merges, broken files), the runtime's loading of it (the GPU faked where the
runtime asks for one), and the built-in table under the user's cache. The `python -m
runtime.tune` command that fills it is checked in test_tune_tool.py; the shared setup is in
tuning_cases.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from formats.errors import MoepackError
from formats.qtensor import QuantSpec
from runtime.kernels import configs, tuning
from runtime.kernels.configs import GemvConfig, candidate_configs, heuristic_config, pick_gemv_config
from runtime.kernels.tuning import TunedEntry, TuningCacheWarning, ensure_loaded, load_entries, load_tuned, save_tuned

from .tuning_cases import (  # noqa: F401 (cache, fake_gpu, isolated: fixtures)
    ENTRIES, EXPERTS, GPU, KPROJ, ROOT, TRITON, W2, W13, cache, fake_gpu, isolated, one_warning, write_tiny)


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
    assert (doc["format"], doc["version"]) == ("moe-pack gemv tuning", 3)
    assert [b["kernels"] for b in doc["devices"]] == [tuning.KERNEL_REVISION]
    entry = next(e for e in doc["devices"][0]["entries"] if e["n"] == 1024)
    assert entry == {"n": 1024, "k": 4096, "bits": 4, "group_size": 64, "meta_bits": 16, "meta_group_size": 0,
                     "tokens": 2, "gated": False, "block_n": 8, "block_k": 512, "split_k": 4, "num_warps": 2,
                     "num_stages": 2, "permute_x": True, "int_x": False, "us": 9.0}


def as_version(version: int):
    """An edit that makes a saved file look written by format `version` (1: before
    GemvConfig.int_x; 1 and 2: before the blocks' kernel revision)."""
    def fn(d):
        d.update(version=version)
        for b in d["devices"]:
            b.pop("kernels")
            for e in b["entries"] if version == 1 else ():
                e.pop("int_x")
    return fn


def test_older_files_parse_and_their_configs_wait_for_a_new_tuning(cache):
    """Files written before GemvConfig.int_x (version 1, like the built-in H100 table) or
    before kernel revisions (version 2) still parse: their entries lacking int_x mean the float
    path, and their blocks were timed on kernel revisions 1 and 2. Those configs never ran
    against the present kernels' candidates, so they are ignored with one warning that says
    to tune again; a version 2 entry without int_x breaks the schema."""
    for version in (1, 2):
        save_tuned(GPU, TRITON, ENTRIES)
        edit(cache, as_version(version))
        with pytest.warns(TuningCacheWarning, match=f"kernel revision {version},.*re-run `python -m runtime.tune"):
            assert load_tuned(GPU, TRITON) == {}
        entries = load_entries(GPU, TRITON, revision=version)
        assert {e.problem: e.config for e in entries} == {e.problem: e.config for e in ENTRIES}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert load_tuned(GPU, TRITON, warn_stale=False) == {}
            assert load_tuned("Tesla T4", TRITON) == {}  # another device's: no warning either
        cache.unlink()
    save_tuned(GPU, TRITON, ENTRIES)
    edit(cache, lambda d: [d.update(version=2), d["devices"][0].pop("kernels"), d["devices"][0]["entries"][0].pop("int_x")])
    with pytest.warns(TuningCacheWarning, match="lacks int_x"):
        assert load_tuned(GPU, TRITON) == {}


def test_saving_drops_this_gpus_stale_revisions_and_keeps_the_rest_readable(cache):
    """A new tuning replaces this device and triton's blocks of other kernel revisions, and
    writes the blocks it keeps (another GPU's, from a version 1 file) as version 3 entries."""
    save_tuned(GPU, TRITON, ENTRIES[:2])
    save_tuned("Tesla T4", TRITON, ENTRIES[2:])
    edit(cache, as_version(1))
    save_tuned(GPU, TRITON, ENTRIES[2:])
    doc = json.loads(cache.read_text())
    assert doc["version"] == 3
    assert sorted((b["device"], b["kernels"]) for b in doc["devices"]) == [(GPU, tuning.KERNEL_REVISION), ("Tesla T4", 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_tuned(GPU, TRITON) == {e.problem: e.config for e in ENTRIES[2:]}
    assert {e.problem for e in load_entries("Tesla T4", TRITON, revision=1)} == {e.problem for e in ENTRIES[2:]}


def test_a_kernel_revision_must_be_a_positive_integer(cache):
    save_tuned(GPU, TRITON, ENTRIES)
    good = cache.read_text()
    for bad in (0, "3", 3.0, True):
        cache.write_text(good)
        edit(cache, lambda d: d["devices"][0].update(kernels=bad))
        with pytest.warns(TuningCacheWarning, match="kernels=.* is not a positive integer"):
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
    "repeated key": lambda p: p.write_text(p.read_text().replace('"version": 3', '"version": 3, "version": 3')),
    "other format": lambda p: edit(p, lambda d: d.update(format="something else")),
    "version 4": lambda p: edit(p, lambda d: d.update(version=4)),
    "block lacks its revision": lambda p: edit(p, lambda d: d["devices"][0].pop("kernels")),
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


# ------------------------------------------------------------------ built-in measurements

H100 = "NVIDIA H100 80GB HBM3"


def test_builtin_configs_are_valid_and_cover_mixtral_decode(monkeypatch):
    """The shipped file parses without a warning, and holds the T=1 problems of a Mixtral
    layer (both gated expert GEMVs and w2 at 2 and 3 bits, q/o and k/v) for the GPU it was
    measured on. It was timed on kernel revision 1 (float activations only), so the runtime
    leaves it alone, silently, until an H100 tunes the present kernels
    (tools/gpu_all.sh stage 10 writes the file that replaces it)."""
    monkeypatch.setattr(tuning, "BUILTIN_PATH", Path(tuning.__file__).resolve().parent / "data" / "gemv-tuning-builtin.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        revision = json.loads(tuning.BUILTIN_PATH.read_text()).get("devices")[0].get("kernels", 1)
        tuned = {e.problem for e in load_entries(H100, "3.6.0", tuning.BUILTIN_PATH, revision=revision)}
        assert tuning.tuned_for(H100, "3.6.0") == ({} if revision != tuning.KERNEL_REVISION else tuned)
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
