"""What the kernel tests share: the devices and tolerances, random packed matrices and experts
with their reference results, the NaN-poisoning fixture, and the GEMV cases (every width x meta
kind x group size on a few shapes and launch configs). Importing it sets up the Triton
interpreter where there is no CUDA (tests/runtime/interpreter.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from formats.header import ExpertLayout, MatrixLayout
from formats.qtensor import QuantSpec, component_views, decode_matrix, encode_matrix
from formats.spec import ALIGNMENT, COMPONENT_ALIGNMENT, align_up
from formats.writer import pack_expert

from .interpreter import interpreted_kernels, use_interpreter

CUDA = torch.cuda.is_available()

interpreted_kernels()  # the kernels interpreted without CUDA, before runtime.kernels is imported below

from runtime.kernels import GemvConfig, release_scratch  # noqa: E402
from runtime.kernels import prefill, qgemv  # noqa: E402

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(CUDA, reason="kernels are compiled for CUDA in this session")),
    pytest.param("cuda", marks=pytest.mark.cuda),
]
# (activation dtype, relative tolerance) per device: float32 under the interpreter, float16 on
# the GPU. The int16-activation path (GemvConfig.int_x, the heuristic's choice for 2-, 3- and
# 4-bit codes) rounds each activation to 1/65534 of its word's largest: ~2e-5 relative on these
# cases, so the CPU bound is 1e-4; the float path keeps 1e-5 (FLOAT_TOL,
# test_gemv_matches_reference).
ACT = {"cpu": (torch.float32, 1e-4), "cuda": (torch.float16, 3e-3)}
FLOAT_TOL = 1e-5


# ------------------------------------------------------------------ helpers

@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    use_interpreter(monkeypatch)


def packed(shape, spec, seed):
    """(bytes, reference W float32 [N, K]) of a random matrix encoded by formats.qtensor."""
    rng = np.random.default_rng(seed)
    n, k = shape
    groups = n * k // spec.group_size
    q = rng.integers(0, 1 << spec.bits, size=shape)
    data = encode_matrix(spec, q=q, scale=rng.uniform(0.01, 0.1, groups),
                         zero=rng.uniform(0, (1 << spec.bits) - 1, groups))
    return data, decode_matrix(component_views(data, shape, spec), shape, spec)


def on_device(data: bytes, device: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double().cpu(), ref.double().cpu()
    return float((y - ref).norm() / ref.norm())


def reference_matmul(x: torch.Tensor, w: np.ndarray) -> torch.Tensor:
    return x.double().cpu() @ torch.from_numpy(w).double().T


@pytest.fixture
def poison(monkeypatch):
    """Every kernel output and the prefill scratch start as NaN: a value the kernel forgets
    to write shows up as NaN in the result."""
    def nan_alloc(shape, dtype, device):
        # integer buffers (the int16 activations) get a value no kernel writes there
        return torch.full(shape, float("nan") if dtype.is_floating_point else -0x5A5A5A5A, dtype=dtype, device=device)

    monkeypatch.setattr(qgemv, "_alloc", nan_alloc)
    release_scratch()
    for device in ("cuda",) if CUDA else ("cpu",):
        for dtype in (torch.float16, torch.float32):
            prefill.scratch(torch.device(device), dtype, 1 << 16).fill_(float("nan"))
    yield
    release_scratch()


# every weight width x meta kind x group size, each on one of a few shapes and launch configs
# (the product of all of them would take minutes in the interpreter)
SHAPES = [(37, 256, 1), (5, 128, 2), (70, 128, 5), (16, 256, 8), (33, 384, 1)]
CONFIGS = [
    None,  # the shape heuristic
    GemvConfig(block_n=64, block_k=512),  # one program, K tail masked inside the tile
    GemvConfig(block_n=16, block_k=128, split_k=2),  # split-K partial sums
    GemvConfig(block_n=32, block_k=32, split_k=3, num_warps=2),  # uneven split-K, smallest tile
    GemvConfig(block_n=16, block_k=128, permute_x=False),  # activations gathered at stride PER
]
META_GROUPS = [128, 256, 24, 1]
CASES = []
for i, (bits, meta, g) in enumerate((b, m, g) for b in (2, 3, 4, 8) for m in (8, 16) for g in (8, 16, 32, 64, 128)):
    n, k, t = SHAPES[i % len(SHAPES)]
    k = max(k, 128) if g == 128 else k
    spec = QuantSpec(bits, g, meta, META_GROUPS[i % len(META_GROUPS)] if meta == 8 else 0)
    config = CONFIGS[(i + i // len(SHAPES)) % len(CONFIGS)]  # vary which shape meets which config
    CASES.append(pytest.param(spec, (n, k), t, config, id=f"b{bits}-m{meta}-g{g}-{n}x{k}-T{t}"))
# launches whose tile rows lie inside one meta group (ROW_META: (step, min) loaded per row)
for spec, shape, t, config in [
    (QuantSpec(2, 16, 8, 4), (32, 256), 1, GemvConfig(block_n=16, block_k=64)),
    (QuantSpec(3, 32, 8, 2), (24, 256), 2, GemvConfig(block_n=8, block_k=64, split_k=2)),
    (QuantSpec(4, 16, 8, 8), (40, 128), 3, GemvConfig(block_n=16, block_k=128)),
]:
    CASES.append(pytest.param(spec, shape, t, config, id=f"rowmeta-b{spec.bits}-{shape[0]}x{shape[1]}-T{t}"))
# 4-bit meta codes (format version 2), two per byte: each width once, odd group counts per row
# (rows starting on a high nibble), meta groups of 1 and odd sizes, and a ROW_META launch
for spec, shape, t, config in [
    (QuantSpec(2, 16, 4, 128), (37, 256), 1, None),
    (QuantSpec(3, 32, 4, 24), (5, 128), 2, CONFIGS[2]),
    (QuantSpec(4, 8, 4, 1), (70, 128), 5, CONFIGS[3]),
    (QuantSpec(8, 64, 4, 256), (16, 256), 8, CONFIGS[4]),
    (QuantSpec(2, 128, 4, 5), (33, 384), 1, CONFIGS[1]),  # 3 groups per row
    (QuantSpec(2, 16, 4, 4), (32, 256), 1, GemvConfig(block_n=16, block_k=64)),  # ROW_META
]:
    CASES.append(pytest.param(spec, shape, t, config, id=f"m4-b{spec.bits}-g{spec.group_size}-{shape[0]}x{shape[1]}-T{t}"))


def make_expert(hidden: int, inter: int, spec: QuantSpec, seed: int):
    """(layout, record bytes, {name: reference W}) of one random expert."""
    mats, offset, data, ref = [], 0, {}, {}
    for i, (name, shape) in enumerate((("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter)))):
        mats.append(MatrixLayout(name, shape, spec, offset))
        offset = align_up(offset + mats[-1].nbytes, COMPONENT_ALIGNMENT)
        data[name], ref[name] = packed(shape, spec, seed + i)
    layout = ExpertLayout(align_up(offset, ALIGNMENT), tuple(mats))
    return layout, pack_expert(layout, data), ref


def reference_expert(x: torch.Tensor, ref: dict) -> torch.Tensor:
    h = torch.nn.functional.silu(reference_matmul(x, ref["w1"])) * reference_matmul(x, ref["w3"])
    return h @ torch.from_numpy(ref["w2"]).double().T
