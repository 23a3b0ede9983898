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
