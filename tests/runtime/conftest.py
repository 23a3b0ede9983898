"""Packed files of the tiny checkpoint, built once per session without the quantizer; the CPU
kernel's default rounding with the suite's int16 pin lifted."""

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


@pytest.fixture
def auto_activations(monkeypatch):
    """The loaded CPU kernel (None without one) with the suite's int16 pin lifted
    (tests/conftest.py): no request, so auto decides. The module's choices, int8's self-check
    and the kernel's switch are as they were after the test."""
    from runtime import cpu_native

    kernel = cpu_native.native_kernel()
    monkeypatch.delenv("MOEPACK_CPU_ACT", raising=False)
    monkeypatch.setattr(cpu_native, "_activations", None)  # a CLI option's choice outlives its command
    monkeypatch.setattr(cpu_native, "_auto", cpu_native._auto)
    if kernel is None:
        yield None
        return
    saved = kernel.act8
    monkeypatch.setattr(kernel, "act8_problem", cpu_native._UNCHECKED)
    yield kernel
    kernel.set_act8(saved)
