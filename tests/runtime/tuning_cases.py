"""What the GEMV tuning tests share (test_tuning.py: the cache file and the runtime's loading of
it; test_tune_tool.py: `python -m runtime.tune`): the fake GPU's name and triton version, a few
tuned entries, the autouse `isolated` fixture (a module that imports it gets it on every test),
the cache path, a pretend CUDA device, a tiny file to tune, and a check for exactly one
TuningCacheWarning."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from formats.header import Recipe
from formats.qtensor import QuantSpec
from formats.synthetic import write_synthetic
from runtime.kernels import configs, tuning
from runtime.kernels.configs import GemvConfig, GemvProblem
from runtime.kernels.tuning import TunedEntry, TuningCacheWarning
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


@pytest.fixture
def fake_gpu(monkeypatch):
    """The device-name and triton-version lookups of a pretend CUDA device; counts lookups."""
    calls = []
    monkeypatch.setattr(tuning, "device_name", lambda device: calls.append(device) or GPU)
    monkeypatch.setattr(tuning, "triton_version", lambda: TRITON)
    return calls


def write_tiny(path: Path, lm_head: QuantSpec = QuantSpec(4, 64, 16)) -> Path:
    recipe = Recipe({"embeddings": FP16, "attention": ATTN, "norms": FP16, "router": FP16, "experts": EXPERTS,
                     "lm_head": lm_head})
    return write_synthetic(path, tiny_config(layers=2, experts=4), recipe, seed=0)
