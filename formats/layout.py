"""Semantic checks of a header: the tensor set the config implies, the shared expert
layout, and the byte ranges of all records (docs/FORMAT.md, section "Validation")."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import HeaderError, LayoutError
from .qtensor import QuantSpec, matrix_layout
from .spec import ALIGNMENT, COMPONENT_ALIGNMENT, EXPERT_MATRICES

if TYPE_CHECKING:
    from .header import Header, ModelConfig

FP16_ONLY_ROLES = ("embeddings", "norms", "router")


def expected_tensors(cfg: "ModelConfig") -> dict[str, tuple[str, int | None, tuple[int, ...]]]:
    """name -> (role, layer, shape) of every non-expert tensor a Mixtral of this config has."""
    H, D = cfg.hidden_size, cfg.head_dim
    out = {"model.embed_tokens.weight": ("embeddings", None, (cfg.vocab_size, H))}
    for L in range(cfg.num_hidden_layers):
        p = f"model.layers.{L}."
        out[p + "input_layernorm.weight"] = ("norms", L, (H,))
        out[p + "self_attn.q_proj.weight"] = ("attention", L, (cfg.num_attention_heads * D, H))
        out[p + "self_attn.k_proj.weight"] = ("attention", L, (cfg.num_key_value_heads * D, H))
        out[p + "self_attn.v_proj.weight"] = ("attention", L, (cfg.num_key_value_heads * D, H))
        out[p + "self_attn.o_proj.weight"] = ("attention", L, (H, cfg.num_attention_heads * D))
        out[p + "post_attention_layernorm.weight"] = ("norms", L, (H,))
        out[p + "block_sparse_moe.gate.weight"] = ("router", L, (cfg.num_local_experts, H))
    out["model.norm.weight"] = ("norms", None, (H,))
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = ("lm_head", None, (cfg.vocab_size, H))
    return out


def expert_shapes(cfg: "ModelConfig") -> dict[str, tuple[int, int]]:
    H, I = cfg.hidden_size, cfg.intermediate_size
    return {"w1": (I, H), "w3": (I, H), "w2": (H, I)}


def _check_recipe(h: "Header") -> None:
    for role in FP16_ONLY_ROLES:
        if h.recipe[role] != QuantSpec(16):
            raise HeaderError(f"recipe.{role} must be 16 (fp16) in format version 1")


def _check_tensors(h: "Header") -> None:
    expected = expected_tensors(h.config)
    seen = set()
    for t in h.tensors:
        if t.name not in expected:
            raise HeaderError(f"tensor {t.name!r} is not part of a Mixtral model of this config")
        if t.name in seen:
            raise HeaderError(f"tensor {t.name!r} is listed twice")
        seen.add(t.name)
        role, layer, shape = expected[t.name]
        if (t.role, t.layer, t.shape) != (role, layer, shape):
            raise HeaderError(
                f"tensor {t.name!r}: role/layer/shape {t.role}/{t.layer}/{list(t.shape)} != expected {role}/{layer}/{list(shape)}"
            )
        if t.spec != h.recipe[t.role]:
            raise HeaderError(f"tensor {t.name!r} is stored as {t.spec.describe()} but recipe.{t.role} says {h.recipe[t.role].describe()}")
        size = matrix_layout(t.shape, t.spec)[1]
        if t.nbytes != size:
            raise LayoutError(f"tensor {t.name!r}: nbytes={t.nbytes} but its layout needs {size}")
    missing = [n for n in expected if n not in seen]
    if missing:
        raise HeaderError(f"the header lacks tensor {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))


def _check_expert_layout(h: "Header") -> None:
    lay, shapes = h.expert_layout, expert_shapes(h.config)
    end = 0
    for m in lay.matrices:
        if m.shape != shapes[m.name]:
            raise HeaderError(f"expert matrix {m.name}: shape {list(m.shape)} != expected {list(shapes[m.name])}")
        if m.spec != h.recipe["experts"]:
            raise HeaderError(f"expert matrix {m.name} is stored as {m.spec.describe()} but recipe.experts says {h.recipe['experts'].describe()}")
        if m.offset % COMPONENT_ALIGNMENT or m.offset < end:
            raise LayoutError(f"expert matrix {m.name}: offset {m.offset} is misaligned or overlaps the previous matrix")
        end = m.offset + m.nbytes
    if lay.record_size % ALIGNMENT or lay.record_size < end:
        raise LayoutError(f"expert record_size={lay.record_size} must be a multiple of {ALIGNMENT} and hold its {end} bytes")
    want = {(L, e) for L in range(h.config.num_hidden_layers) for e in range(h.config.num_local_experts)}
    got = [(e.layer, e.expert) for e in h.experts]
    if len(got) != len(set(got)) or set(got) != want:
        raise HeaderError(
            f"experts must list each (layer, expert) of {h.config.num_hidden_layers} x {h.config.num_local_experts} exactly once"
        )
    if h.expert_counts is not None and (
        len(h.expert_counts) != h.config.num_hidden_layers
        or any(len(r) != h.config.num_local_experts for r in h.expert_counts)
    ):
        raise HeaderError("expert_counts must be [num_hidden_layers][num_local_experts]")


def record_ranges(h: "Header") -> list[tuple[int, int, str]]:
    """(offset, nbytes, label) of every record, in file order."""
    ranges = [(t.offset, t.nbytes, f"tensor {t.name}") for t in h.tensors]
    ranges += [(e.offset, h.expert_layout.record_size, f"expert {e.layer}.{e.expert}") for e in h.experts]
    return sorted(ranges)


def _check_ranges(h: "Header") -> None:
    end = 0
    for offset, nbytes, label in record_ranges(h):
        if offset % ALIGNMENT:
            raise LayoutError(f"{label}: offset {offset} is not a multiple of {ALIGNMENT}")
        if offset < end:
            raise LayoutError(f"{label}: bytes [{offset}, {offset + nbytes}) overlap the previous record (ends at {end})")
        end = offset + nbytes
        if end > h.data_size:
            raise LayoutError(f"{label}: bytes [{offset}, {end}) run past the data section ({h.data_size} bytes)")
    if end != h.data_size:
        raise LayoutError(f"the data section is {h.data_size} bytes but its last record ends at {end}")


def validate_header(h: "Header") -> None:
    _check_recipe(h)
    _check_tensors(h)
    _check_expert_layout(h)
    _check_ranges(h)
