"""End to end: `moe-pack quantize` the tiny checkpoint, then `moe-pack inspect` the result;
and every user-facing failure is one `error:` line, one `hint:` line, exit status 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib import import_module, metadata
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from formats.reader import MoepackFile
from formats.spec import EXPERT_MATRICES
from tests.quantize.helpers import one_torch_thread  # noqa: F401 (autouse fixture)
from tests.quantize.helpers import assert_user_error, checkpoint_tensors, copy_checkpoint, edit_json, packed, run_cli

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {
    "a16e16": ("--attn-bits", "16", "--expert-bits", "16"),
    "a4e2": ("--attn-bits", "4", "--expert-bits", "2"),
    "a4e3": ("--attn-bits", "4", "--expert-bits", "3"),
    "a4e2m8": ("--attn-bits", "4", "--expert-bits", "2", "--expert-meta-bits", "8"),  # the paper's recipe: version 1
}
REPORT_KEYS = ["file", "model", "tokenizer", "quantizer", "roles", "experts", "errors", "gpu_memory", "has_expert_counts",
               "expert_routing"]


@pytest.fixture(scope="module", params=list(RECIPES))
def recipe_file(request, tmp_path_factory, tiny_checkpoint):
    args = RECIPES[request.param]
    return request.param, packed(tmp_path_factory, tiny_checkpoint, *args)


def _bits(name: str) -> tuple[int, int]:
    name = name.split("m")[0]
    return int(name[1 : name.index("e")]), int(name[name.index("e") + 1 :])


def test_inspect_text(recipe_file):
    name, path = recipe_file
    attn, experts = _bits(name)
    r = run_cli("inspect", path)
    assert r.exit_code == 0, r.stderr
    text = r.stdout
    for needle in ("layers             2", "hidden size        64", "intermediate size  128", "kv heads           2",
                   "experts            4", "experts per token  2", "vocab size         320", "context length     256",
                   "rope theta         1e+06", "chat template: present", "method hqq", "* GPU memory estimate",
                   "assumptions:", "record), "):
        assert needle in text, needle
    meta = 8 if name.endswith("m8") else 4  # 2/3-bit experts: 4-bit meta by default
    want_experts = "fp16" if experts == 16 else f"{experts}-bit g{16 if experts == 2 else 64}, {meta}-bit meta g128"
    assert f"experts     {want_experts}" in text
    assert f"format version {2 if meta == 4 and experts != 16 else 1}," in text
    want_attn = "fp16" if attn == 16 else "4-bit g64, 8-bit meta g256"
    assert f"attention   {want_attn}" in text


def test_inspect_json(recipe_file):
    name, path = recipe_file
    attn, experts = _bits(name)
    r = run_cli("inspect", path, "--json")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert list(rep) == REPORT_KEYS
    assert rep["file"]["size_bytes"] == path.stat().st_size
    assert rep["model"]["layers"] == 2 and rep["model"]["experts"] == 4 and rep["model"]["rope_theta"] == 1e6
    assert rep["roles"]["experts"]["quant"]["bits"] == experts
    assert rep["file"]["format_version"] == (1 if name.endswith("m8") or experts == 16 else 2)
    if experts != 16:
        assert rep["roles"]["experts"]["quant"]["meta_bits"] == (8 if name.endswith("m8") else 4)
    assert rep["roles"]["attention"]["quant"]["bits"] == attn
    assert rep["roles"]["attention"]["tensors"] == 8 and rep["roles"]["norms"]["tensors"] == 5
    ex = rep["experts"]
    assert ex["weights"] == 3 * 64 * 128
    assert ex["bits_per_weight"] == pytest.approx(ex["record_size"] * 8 / ex["weights"])
    if experts == 16:
        assert ex["payload_bits_per_weight"] == 16
    kv = 2 * 2 * 2 * 16 * 256 * 2  # 2 x layers x kv_heads x head_dim x ctx x 2 bytes
    gpu = rep["gpu_memory"]
    assert gpu["kv_cache_bytes"] == kv
    assert [c["experts_per_layer"] for c in gpu["configs"]] == [1, 2, 4]  # 4 = all experts of the tiny model
    for c in gpu["configs"]:
        assert c["total_bytes"] == gpu["non_expert_bytes"] + c["experts_per_layer"] * 2 * ex["record_size"] + kv
    # the offloading runtime's smallest budget: one layer's top-k (2) records in one pool for all layers
    sp = gpu["shared_pool"]
    assert sp["experts"] == 2 and sp["total_bytes"] == gpu["non_expert_bytes"] + 2 * ex["record_size"] + kv
    assert "2 in all" in run_cli("inspect", path).stdout


def test_inspect_verify(recipe_file):
    _, path = recipe_file
    r = run_cli("inspect", path, "--verify")
    assert r.exit_code == 0, r.stderr
    assert "verify: all 25 records match their crc32" in r.stdout
    rep = json.loads(run_cli("inspect", path, "--verify", "--json").stdout)
    assert rep["verify"]["ok"] and rep["verify"]["records"] == 25


def test_inspect_tensors_lists_every_tensor(recipe_file, tiny_checkpoint):
    _, path = recipe_file
    rep = json.loads(run_cli("inspect", path, "--tensors", "--json").stdout)
    names = [t["name"] for t in rep["tensors"]]
    assert sorted(names) == sorted(checkpoint_tensors(tiny_checkpoint))  # tiny checkpoint uses hub naming
    assert [t["offset"] for t in rep["tensors"]] == sorted(t["offset"] for t in rep["tensors"])
    text = run_cli("inspect", path, "--tensors").stdout
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in text and "lm_head.weight" in text


def test_fp16_file_equals_checkpoint_exactly(tmp_path_factory, tiny_checkpoint):
    path = packed(tmp_path_factory, tiny_checkpoint, *RECIPES["a16e16"])
    ref = checkpoint_tensors(tiny_checkpoint)
    with MoepackFile(path) as mf:
        for t in mf.header.tensors:
            assert np.array_equal(mf.tensor_array(t.name), ref[t.name]), t.name
            assert t.rel_error == 0.0
        for e in mf.header.experts:
            arrays = mf.expert_arrays(e.layer, e.expert)
            for m in EXPERT_MATRICES:
                assert np.array_equal(arrays[m], ref[f"model.layers.{e.layer}.block_sparse_moe.experts.{e.expert}.{m}.weight"])
            assert e.rel_error == (0.0, 0.0, 0.0)
        tok = mf.header.tokenizer
        assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,) and tok.chat_template and tok.tokenizer_json
        assert mf.header.quantizer.source == str(tiny_checkpoint)


def test_console_script_and_module_entry(tmp_path_factory, tiny_checkpoint):
    """`moe-pack` resolves to quantize.cli:main; a real process prints JSON and exits 0."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["moe-pack"].split(":")
    assert callable(getattr(import_module(module), func))
    installed = [ep for ep in metadata.entry_points(group="console_scripts") if ep.name == "moe-pack"]
    if installed:  # after `pip install -e .`
        assert installed[0].value == scripts["moe-pack"]
    path = packed(tmp_path_factory, tiny_checkpoint, *RECIPES["a4e2"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "quantize.cli", "inspect", str(path), "--json"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"]["layers"] == 2


def test_inspect_imports_neither_torch_nor_hqq(tmp_path_factory, tiny_checkpoint):
    path = packed(tmp_path_factory, tiny_checkpoint, *RECIPES["a4e2"])
    code = (
        "import sys\nfrom quantize.cli import cli\n"
        f"cli(['inspect', {str(path)!r}, '--verify'], standalone_mode=False)\n"
        "bad = [m for m in ('torch', 'hqq', 'transformers', 'safetensors') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------- failures


def test_error_non_mixtral(tmp_path, tiny_checkpoint):
    src = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    edit_json(src / "config.json", {"model_type": "llama"})
    r = run_cli("quantize", src, "-o", tmp_path / "x.moepack")
    assert_user_error(r, "config.json", "'llama'", "not 'mixtral'")
    assert not (tmp_path / "x.moepack").exists()


def test_error_missing_config(tmp_path, tiny_checkpoint):
    src = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    (src / "config.json").unlink()
    assert_user_error(run_cli("quantize", src, "-o", tmp_path / "x.moepack"), "config.json", "no such file")


def _drop_tensor(src: Path, name: str, from_index: bool) -> str:
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"][name]
    tensors = load_file(src / shard)
    del tensors[name]
    save_file(tensors, src / shard, metadata={"format": "pt"})
    if from_index:
        del index["weight_map"][name]
        index_path.write_text(json.dumps(index))
    return shard


@pytest.mark.parametrize("from_index", [False, True], ids=["shard-only", "shard-and-index"])
def test_error_missing_tensor(tmp_path, tiny_checkpoint, from_index):
    src = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    shard = _drop_tensor(src, name, from_index)
    r = run_cli("quantize", src, "-o", tmp_path / "x.moepack")
    assert_user_error(r, name, "model.safetensors.index.json" if from_index else shard)
    assert list(tmp_path.glob("*moepack*")) == []


def test_error_missing_shard(tmp_path, tiny_checkpoint):
    src = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    (src / "model-00002-of-00003.safetensors").unlink()
    r = run_cli("quantize", src, "-o", tmp_path / "x.moepack")
    assert_user_error(r, "model-00002-of-00003.safetensors", "no such shard")


@pytest.mark.parametrize("args, needles", [
    (("--expert-group-size", "24"), ("--expert-group-size 24", "hidden size (64)")),
    (("--attn-bits", "4", "--attn-group-size", "48"), ("--attn-group-size 48", "hidden size")),
    (("--expert-bits", "5"), ("--expert-bits 5", "not supported")),
    (("--attn-bits", "1"), ("--attn-bits 1",)),
    (("--meta-bits", "6"), ("--meta-bits 6",)),
    (("--expert-meta-bits", "32"), ("--expert-meta-bits 32",)),
    (("--expert-group-size", "12"), ("--expert-group-size 12", "multiple of 8")),
    (("--device", "cuda"), ("--device cuda",)),
])
def test_error_bad_options(tmp_path, tiny_checkpoint, args, needles):
    if "cuda" in args:
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present: --device cuda is valid")
    r = run_cli("quantize", tiny_checkpoint, "-o", tmp_path / "x.moepack", *args)
    assert_user_error(r, *needles)
    assert list(tmp_path.iterdir()) == []


def test_error_output_folder_missing(tmp_path, tiny_checkpoint):
    r = run_cli("quantize", tiny_checkpoint, "-o", tmp_path / "nope" / "x.moepack")
    assert_user_error(r, "output folder", "does not exist")


def test_error_source_missing(tmp_path):
    r = run_cli("quantize", tmp_path / "no-such-ckpt", "-o", tmp_path / "x.moepack")
    assert_user_error(r, "no-such-ckpt", "no such folder")


def test_error_inspect_missing_file(tmp_path):
    assert_user_error(run_cli("inspect", tmp_path / "nope.moepack"), "nope.moepack", "no such file")


def test_error_inspect_corrupt_record(tmp_path_factory, tiny_checkpoint, tmp_path):
    good = packed(tmp_path_factory, tiny_checkpoint, *RECIPES["a4e2"])
    bad = tmp_path / "bad.moepack"
    raw = bytearray(good.read_bytes())
    with MoepackFile(good) as mf:
        e = mf.header.expert(1, 2)
        pos = mf.data_offset + e.offset + 100
    raw[pos] ^= 0x40
    bad.write_bytes(bytes(raw))
    assert run_cli("inspect", bad).exit_code == 0  # the header is intact: the report still works
    r = run_cli("inspect", bad, "--verify")
    assert_user_error(r, "bad.moepack", "expert 1.2", "crc32")
    assert "corrupted" in r.stderr  # ChecksumError's hint


def test_error_inspect_corrupt_header(tmp_path_factory, tiny_checkpoint, tmp_path):
    raw = bytearray(packed(tmp_path_factory, tiny_checkpoint, *RECIPES["a4e2"]).read_bytes())
    raw[40] ^= 0x01  # inside the JSON header
    bad = tmp_path / "bad.moepack"
    bad.write_bytes(bytes(raw))
    assert_user_error(run_cli("inspect", bad), "header crc32")


def test_error_inspect_not_moepack(tmp_path, tiny_checkpoint):
    assert_user_error(run_cli("inspect", tiny_checkpoint / "config.json"), "bad magic")
    assert_user_error(run_cli("inspect", tiny_checkpoint), "not a regular file")
