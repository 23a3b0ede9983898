"""Synthetic .moepack files written directly in packed form: random codes and plausible
scales, no checkpoint and no quantizer needed. Used by tests and by the benchmark, which
needs real Mixtral-8x7B shapes without a 93 GB download."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from .header import ModelConfig, QuantizerInfo, Recipe, TokenizerInfo
from .layout import expected_tensors
from .qtensor import QuantSpec, encode_matrix
from .spec import EXPERT_MATRICES
from .writer import MoepackWriter


def random_matrix_bytes(rng: np.random.Generator, shape: tuple[int, ...], spec: QuantSpec, std: float) -> bytes:
    """A matrix whose dequantized values have roughly standard deviation `std`."""
    if not spec.quantized:
        return encode_matrix(spec, weight=(rng.standard_normal(shape, dtype=np.float32) * std))
    levels = (1 << spec.bits) - 1
    n_groups = shape[0] * shape[1] // spec.group_size
    q = rng.integers(0, levels + 1, size=shape, dtype=np.uint8)
    # uniform codes have std levels/sqrt(12); scale so the weights get the asked-for std
    scale = (std * np.sqrt(12.0) / max(levels, 1)) * (0.75 + 0.5 * rng.random(n_groups, dtype=np.float32))
    zero = levels / 2 + rng.standard_normal(n_groups, dtype=np.float32) * 0.1
    return encode_matrix(spec, q=q, scale=scale, zero=zero)


def write_synthetic(
    path: str | os.PathLike,
    config: ModelConfig,
    recipe: Recipe,
    *,
    seed: int = 0,
    tokenizer: TokenizerInfo | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    rng = np.random.default_rng(seed)
    quantizer = QuantizerInfo("moe-pack", "synthetic", "random", "-", f"synthetic seed={seed}")
    with MoepackWriter(path, config=config, tokenizer=tokenizer or TokenizerInfo(), quantizer=quantizer, recipe=recipe) as w:
        tensors = expected_tensors(config)
        by_layer: dict[int | None, list[str]] = {}
        for name, (role, layer, shape) in tensors.items():
            by_layer.setdefault(layer, []).append(name)

        def put(name: str) -> None:
            role, layer, shape = tensors[name]
            if role == "norms":
                payload = encode_matrix(QuantSpec(16), weight=np.ones(shape, np.float32))
            else:
                std = 1.0 if role == "embeddings" else 1.0 / np.sqrt(shape[-1])
                payload = random_matrix_bytes(rng, shape, recipe[role], std)
            w.add_tensor(name, role, layer, shape, payload)

        put("model.embed_tokens.weight")
        for L in range(config.num_hidden_layers):
            for name in by_layer[L]:
                put(name)
            for e in range(config.num_local_experts):
                mats = {
                    m.name: random_matrix_bytes(rng, m.shape, m.spec, 1.0 / np.sqrt(m.shape[1]))
                    for m in w.expert_layout.matrices
                }
                assert tuple(mats) == EXPERT_MATRICES
                w.add_expert(L, e, mats)
            if progress:
                progress(f"layer {L}")
        for name in by_layer[None]:
            if name != "model.embed_tokens.weight":
                put(name)
        return w.finish()
