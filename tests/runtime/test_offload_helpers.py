"""Shared fixtures-in-code of the offloading tests: tiny configs, headers and files (this
module holds no tests)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from formats.header import Header, ModelConfig, Recipe
from formats.qtensor import QuantSpec
from formats.synthetic import write_synthetic
from runtime.offload.synthfile import synthetic_header

FP16 = QuantSpec(16)
RECIPE_4_2 = Recipe({"embeddings": FP16, "attention": QuantSpec(4, 64, 8, 256), "norms": FP16, "router": FP16,
                     "experts": QuantSpec(2, 16, 8, 128), "lm_head": FP16})


def tiny_config(layers: int = 3, experts: int = 8, **overrides) -> ModelConfig:
    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, num_local_experts=experts, num_experts_per_tok=2,
              rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=256)
    kw.update(overrides)
    return ModelConfig(**kw)


def mixtral_config() -> ModelConfig:
    return ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_local_experts=8,
                       num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768)


def tiny_header(layers: int = 3, experts: int = 8, counts: bool = False, mixtral: bool = False) -> Header:
    cfg = mixtral_config() if mixtral else tiny_config(layers, experts)
    c = None
    if counts:
        c = tuple(tuple(100 - 10 * e for e in range(cfg.num_local_experts)) for _ in range(cfg.num_hidden_layers))
    return synthetic_header(cfg, RECIPE_4_2, c)


def tiny_file(folder: Path, layers: int = 3, experts: int = 8, seed: int = 0) -> Path:
    return write_synthetic(Path(folder) / f"tiny-{layers}x{experts}-s{seed}.moepack", tiny_config(layers, experts), RECIPE_4_2, seed=seed)


def load_tool(name: str):
    """The module tools/<name>.py (tools/ is not a package)."""
    path = Path(__file__).resolve().parents[2] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there while the class is built
    spec.loader.exec_module(mod)
    return mod
