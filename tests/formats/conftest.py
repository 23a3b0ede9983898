from __future__ import annotations

from pathlib import Path

import pytest

from formats.synthetic import write_synthetic
from tests.formats.helpers import RECIPE, TINY, TINY_TIED, TinyFile


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyFile:
    """A valid synthetic file of the TINY config (read it, never write to it)."""
    return TinyFile(write_synthetic(tmp_path_factory.mktemp("tiny") / "tiny.moepack", TINY, RECIPE, seed=1))


@pytest.fixture(scope="session")
def smallest(tmp_path_factory) -> Path:
    """The smallest valid file we can make: tied embeddings, so one record fewer."""
    return write_synthetic(tmp_path_factory.mktemp("smallest") / "smallest.moepack", TINY_TIED, RECIPE, seed=2)
