"""Packed files of the tiny checkpoint, built once per session without the quantizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.runtime.packing_helpers import RECIPE_4_2, RECIPE_4_2_M4, RECIPE_4_3, RECIPE_16, write_moepack

RECIPES = {"16": RECIPE_16, "4/2": RECIPE_4_2, "4/3": RECIPE_4_3, "4/2m4": RECIPE_4_2_M4}


@pytest.fixture(scope="session")
def packed_files(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """recipe name ("16", "4/2", "4/3", "4/2m4") -> .moepack of the tiny checkpoint."""
    out = tmp_path_factory.mktemp("packed")
    return {name: write_moepack(tiny_checkpoint, out / f"tiny-{name.replace('/', '-')}.moepack", r) for name, r in RECIPES.items()}


@pytest.fixture(scope="session")
def file16(packed_files) -> Path:
    return packed_files["16"]


@pytest.fixture(scope="session")
def file42(packed_files) -> Path:
    return packed_files["4/2"]


@pytest.fixture(scope="session")
def no_tokenizer_file(tiny_checkpoint, tmp_path_factory) -> Path:
    return write_moepack(tiny_checkpoint, tmp_path_factory.mktemp("notok") / "notok.moepack", RECIPE_4_2, with_tokenizer=False)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tiny models gain nothing from intra-op threads, and on a busy 2-core machine
    spinning thread pools make them many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
