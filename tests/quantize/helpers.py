"""Shared by tests/quantize and tests/test_cli.py: run the CLI, and quantize the tiny
checkpoint once per session per recipe (hqq on CPU is the slow part of these tests)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open

from formats.header import ModelConfig
from quantize.cli import cli

_CACHE: dict[tuple, Path] = {}

MIXTRAL = ModelConfig(  # Mixtral-8x7B (FACTS.md section 1)
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5,
    rope_theta=1e6, max_position_embeddings=32768,
)


def run_cli(*args: str):
    """Invoke `moe-pack ARGS...` in-process; stdout and stderr are captured separately."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_user_error(result, *needles: str) -> None:
    """Exit 1, `error: ...` and `hint: ...` on stderr (one line each), no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), result.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def packed(tmp_path_factory, ckpt: Path, *args: str) -> Path:
    """The tiny checkpoint quantized with `moe-pack quantize ARGS`, once per session."""
    key = (str(ckpt),) + tuple(args)
    if key not in _CACHE:
        out = tmp_path_factory.mktemp("packed") / "model.moepack"
        result = run_cli("quantize", ckpt, "-o", out, "--quiet", *args)
        assert result.exit_code == 0, result.stderr
        _CACHE[key] = out
    return _CACHE[key]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def checkpoint_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint folder as float32 numpy (test-sized checkpoints only)."""
    out = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name).float().numpy()
    return out


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, update: dict | None = None, remove: tuple[str, ...] = ()) -> None:
    data = json.loads(path.read_text())
    data.update(update or {})
    for key in remove:
        data.pop(key, None)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Import into a test module to run it with one torch thread. The tiny matrices gain
    nothing from threads, and on a busy 2-core machine OpenMP's barrier turns every small
    op into ~10 ms (hqq runs ~100 of them per matrix)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
