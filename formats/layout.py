"""Semantic checks of a header: the tensor set the config implies, the shared expert
layout, and the byte ranges of all records (docs/FORMAT.md, section "Validation")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from .errors import HeaderError, LayoutError
from .qtensor import QuantSpec, matrix_layout
from .spec import ALIGNMENT, COMPONENT_ALIGNMENT

if TYPE_CHECKING:
    from .header import Header, ModelConfig

FP16_ONLY_ROLES = ("embeddings", "norms", "router")


# The tensors of one decoder layer, in file order: HF name suffix -> (role, shape from config).
_LAYER_TENSORS = {
    "input_layernorm.weight": ("norms", lambda c: (c.hidden_size,)),
    "self_attn.q_proj.weight": ("attention", lambda c: (c.num_attention_heads * c.head_dim, c.hidden_size)),
    "self_attn.k_proj.weight": ("attention", lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size)),
    "self_attn.v_proj.weight": ("attention", lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size)),
    "self_attn.o_proj.weight": ("attention", lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim)),
    "post_attention_layernorm.weight": ("norms", lambda c: (c.hidden_size,)),
    "block_sparse_moe.gate.weight": ("router", lambda c: (c.num_local_experts, c.hidden_size)),
}
_LAYER_PREFIX = "model.layers."


def _iter_expected(cfg: "ModelConfig") -> Iterator[tuple[str, tuple[str, int | None, tuple[int, ...]]]]:
    H = cfg.hidden_size
    yield "model.embed_tokens.weight", ("embeddings", None, (cfg.vocab_size, H))
    for L in range(cfg.num_hidden_layers):
        for suffix, (role, shape) in _LAYER_TENSORS.items():
            yield f"{_LAYER_PREFIX}{L}.{suffix}", (role, L, shape(cfg))
    yield "model.norm.weight", ("norms", None, (H,))
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", ("lm_head", None, (cfg.vocab_size, H))


def expected_tensors(cfg: "ModelConfig") -> dict[str, tuple[str, int | None, tuple[int, ...]]]:
    """name -> (role, layer, shape) of every non-expert tensor a Mixtral of this config has."""
    return dict(_iter_expected(cfg))


def expected_tensor(cfg: "ModelConfig", name: str) -> tuple[str, int | None, tuple[int, ...]] | None:
    """expected_tensors(cfg).get(name) without building the dict: a header's config may claim
    2**31 layers, and validation must cost time in proportion to the header, not to the claim."""
    if name.startswith(_LAYER_PREFIX):
        num, _, suffix = name[len(_LAYER_PREFIX):].partition(".")
        if suffix not in _LAYER_TENSORS or not (num.isascii() and num.isdigit() and len(num) <= 10):
            return None
        layer = int(num)
        if str(layer) != num or layer >= cfg.num_hidden_layers:
            return None
        role, shape = _LAYER_TENSORS[suffix]
        return role, layer, shape(cfg)
    if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        H = cfg.hidden_size
        return {
            "model.embed_tokens.weight": ("embeddings", None, (cfg.vocab_size, H)),
            "model.norm.weight": ("norms", None, (H,)),
            "lm_head.weight": None if cfg.tie_word_embeddings else ("lm_head", None, (cfg.vocab_size, H)),
        }[name]
    return None


def expected_tensor_count(cfg: "ModelConfig") -> int:
    return 2 + len(_LAYER_TENSORS) * cfg.num_hidden_layers + (0 if cfg.tie_word_embeddings else 1)


def expert_shapes(cfg: "ModelConfig") -> dict[str, tuple[int, int]]:
    H, I = cfg.hidden_size, cfg.intermediate_size
    return {"w1": (I, H), "w3": (I, H), "w2": (H, I)}


def _check_recipe(h: "Header") -> None:
    for role in FP16_ONLY_ROLES:
        if h.recipe[role] != QuantSpec(16):
            raise HeaderError(f"recipe.{role} must be 16 (fp16) in format versions 1 and 2")


def _check_tensors(h: "Header") -> None:
    seen = set()
    for t in h.tensors:
        want = expected_tensor(h.config, t.name)
        if want is None:
            raise HeaderError(f"tensor {t.name!r} is not part of a Mixtral model of this config")
        if t.name in seen:
            raise HeaderError(f"tensor {t.name!r} is listed twice")
        seen.add(t.name)
        role, layer, shape = want
        if (t.role, t.layer, t.shape) != (role, layer, shape):
            raise HeaderError(
                f"tensor {t.name!r}: role/layer/shape {t.role}/{t.layer}/{list(t.shape)} != expected {role}/{layer}/{list(shape)}"
            )
        if t.spec != h.recipe[t.role]:
            raise HeaderError(f"tensor {t.name!r} is stored as {t.spec.describe()} but recipe.{t.role} says {h.recipe[t.role].describe()}")
        size = matrix_layout(t.shape, t.spec)[1]
        if t.nbytes != size:
            raise LayoutError(f"tensor {t.name!r}: nbytes={t.nbytes} but its layout needs {size}")
    n_missing = expected_tensor_count(h.config) - len(seen)
    if n_missing:
        # every listed name is expected and unique, so a missing one shows up within len(seen) + 1 steps
        first = next(n for n, _ in _iter_expected(h.config) if n not in seen)
        raise HeaderError(f"the header lacks tensor {first!r}" + (f" and {n_missing - 1} more" if n_missing > 1 else ""))


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
    n_layers, n_experts = h.config.num_hidden_layers, h.config.num_local_experts
    seen = set()
    for e in h.experts:
        if e.layer >= n_layers or e.expert >= n_experts:
            raise HeaderError(f"expert {e.layer}.{e.expert} does not exist in a model of {n_layers} layers x {n_experts} experts")
        if (e.layer, e.expert) in seen:
            raise HeaderError(f"expert {e.layer}.{e.expert} is listed twice")
        seen.add((e.layer, e.expert))
    n_missing = n_layers * n_experts - len(seen)
    if n_missing:
        # a generator, not itertools.product: product would first copy both ranges into tuples
        L, E = next((L, E) for L in range(n_layers) for E in range(n_experts) if (L, E) not in seen)
        raise HeaderError(f"the header lacks expert {L}.{E}" + (f" and {n_missing - 1} more" if n_missing > 1 else ""))
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
