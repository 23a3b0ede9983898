import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The tests check the defaults: a switch left in the shell (MOEPACK_CPU_ACT=int8 from a
# benchmark, MOEPACK_CPU_STEP=0 from an A/B run) would change which path runs and its rounding.
# Only the build cache's folder passes; a test that wants a switch sets it itself (monkeypatch).
for _name in [n for n in os.environ if n.startswith("MOEPACK_") and n != "MOEPACK_CACHE_DIR"]:
    del os.environ[_name]
# One exception: a model wholly on the CPU rounds its activations to int8 by default (auto), and
# that rounding can flip a tiny random model's top-k routing, so no float reference holds to it.
# The suite compares against references at int16's rounding; int8 and auto have their own tests
# (tests/runtime/test_cpu_act8.py), which lift this.
os.environ["MOEPACK_CPU_ACT"] = "int16"

from tests.tiny import make_tiny_checkpoint  # noqa: E402


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny fp16 Mixtral checkpoint folder (2 shards, tokenizer, chat template)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-mixtral")
