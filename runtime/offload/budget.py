"""The GPU memory plan: what a budget must hold besides the experts, and how many fixed-size
expert slots the rest of it buys. Pure functions of header sizes, so a too-small budget is
refused before a byte of the model is loaded, and the figures are unit-testable.

The estimate follows the runtime's paths: quantized attention / lm_head stay packed on the
device (runtime.qlinear.QuantLinear), fp16 tensors (embeddings, norms, routers) are converted
to the compute dtype; the transient workspace depends on whether the fused kernels run
(workspace_bytes).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from formats.errors import ConfigError
from formats.header import Header
from formats.qtensor import QuantSpec

GiB = 1 << 30
MiB = 1 << 20

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", re.IGNORECASE)

POLICIES = ("layer", "shared", "lfu", "shared-lfu", "none")
SHARED_POLICIES = ("shared", "shared-lfu")  # one pool for every layer


def parse_size(text: str | int, option: str = "--gpu-memory") -> int:
    """'12GiB', '800MB', '1.5G' (bare K/M/G/T are binary, like GiB), '4096' -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = _SIZE.fullmatch(str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(
                f"{option} {text!r} is not a size",
                hint="write a number with an optional unit, like 12GiB, 800MB, 1.5G or 4096 (bytes)",
            )
        value, unit = float(m.group(1)), m.group(2).lower()
    size = value * _UNITS[unit]
    if not math.isfinite(size) or size <= 0 or size >= 2**63:
        raise ConfigError(f"{option} {text!r} must be a positive size below 8 EiB", hint="e.g. 12GiB or 800MB")
    return int(size)


def format_size(n: int | float) -> str:
    """Bytes as GiB / MiB with two decimals, the units a user passes back to --gpu-memory."""
    if abs(n) >= GiB:
        return f"{n / GiB:.2f}GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.1f}MiB"
    if abs(n) >= 1024:
        return f"{n / 1024:.1f}KiB"
    return f"{int(n)}B"


def _ceil_size(n: int) -> str:
    """A size string that is never smaller than n (so 'pass this' really works)."""
    if n >= GiB:
        return f"{math.ceil(n / GiB * 100) / 100:.2f}GiB"
    return f"{math.ceil(n / MiB)}MiB"


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def _dequant_transient(numel: int, spec: QuantSpec, dtype_bytes: int) -> int:
    """Peak extra bytes of runtime.dequant.dequantize on one matrix: the unpacked uint8 codes,
    the float32 codes, (q - z) and (q - z) * s are alive together (the cast to the compute
    dtype comes after the first two are gone)."""
    if not spec.quantized:
        return numel * dtype_bytes
    return numel * (1 + 4 + 4 + 4)


@dataclass(frozen=True)
class MemoryPlan:
    """Where a GPU budget goes. All figures in bytes."""

    budget: int
    non_expert_bytes: int  # weights on the device (attention, norms, routers, lm_head, embeddings unless on the host)
    kv_cache_bytes: int
    workspace_bytes: int  # activations and dequantization temporaries
    reserve_bytes: int  # CUDA context and allocator slack, outside PyTorch's tensors
    record_size: int
    n_slots: int  # expert slots allocated once: [n_slots, record_size] uint8
    min_slots: int  # below this a token cannot run under the plan's cache policy (min_expert_slots)
    total_experts: int
    embed_on_host: bool = False  # the embedding table is in host RAM, not in non_expert_bytes
    policy: str = "layer"  # the cache policy the slots are planned for (it sets min_slots)

    @property
    def fixed_bytes(self) -> int:
        return self.non_expert_bytes + self.kv_cache_bytes + self.workspace_bytes + self.reserve_bytes

    @property
    def slot_bytes(self) -> int:
        return self.n_slots * self.record_size

    @property
    def min_budget(self) -> int:
        return self.fixed_bytes + self.min_slots * self.record_size

    @property
    def all_resident(self) -> bool:
        return self.n_slots >= self.total_experts

    def to_json(self) -> dict:
        return {
            "budget": self.budget, "non_expert_bytes": self.non_expert_bytes, "kv_cache_bytes": self.kv_cache_bytes,
            "workspace_bytes": self.workspace_bytes, "reserve_bytes": self.reserve_bytes,
            "record_size": self.record_size, "n_slots": self.n_slots, "min_slots": self.min_slots,
            "total_experts": self.total_experts, "embed_on_host": self.embed_on_host, "policy": self.policy,
        }

    def describe(self) -> str:
        return (
            f"GPU plan {format_size(self.budget)}: non-expert weights {format_size(self.non_expert_bytes)}"
            f"{' (embeddings in host RAM)' if self.embed_on_host else ''}, "
            f"KV cache {format_size(self.kv_cache_bytes)}, workspace {format_size(self.workspace_bytes)}, "
            f"reserve {format_size(self.reserve_bytes)}, {self.n_slots} of {self.total_experts} experts "
            f"({format_size(self.slot_bytes)}, {format_size(self.record_size)} each)"
        )


def non_expert_bytes(header: Header, dtype_bytes: int, dequantize_at_load: bool = False, context_tokens: int = 0,
                     embed_on_host: bool = False) -> int:
    """Device bytes of every non-expert tensor as runtime.loader keeps it, plus the rotary
    cos/sin tables of the allocated context (buffers of the model, like the weights).
    `embed_on_host`: the embedding table stays in host RAM (load_model(embed_on_host=True);
    never with tied embeddings, whose one matrix is the lm_head)."""
    total = 2 * context_tokens * header.config.head_dim * dtype_bytes
    host = "model.embed_tokens.weight" if embed_on_host and not header.config.tie_word_embeddings else None
    for t in header.tensors:
        if t.name == host:
            continue
        if t.spec.quantized and not dequantize_at_load:
            total += t.nbytes
        else:
            total += _numel(t.shape) * dtype_bytes
    return total


def embed_table_bytes(header: Header, dtype_bytes: int) -> int:
    """Device bytes of the embedding table (load_model converts it to the compute dtype); 0
    with tied embeddings, where the one matrix is counted as the lm_head."""
    if header.config.tie_word_embeddings:
        return 0
    return _numel(header.tensor("model.embed_tokens.weight").shape) * dtype_bytes


def kv_cache_bytes(header: Header, context_tokens: int, dtype_bytes: int) -> int:
    c = header.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * context_tokens * dtype_bytes


def workspace_bytes(header: Header, context_tokens: int, dtype_bytes: int, prefill_tokens: int,
                    fused: bool = False) -> int:
    """Largest transient of one decode/prefill step, plus the activations of a prefill chunk of
    `prefill_tokens`. The plain-torch path (fused False) dequantizes an expert whole (two of its
    matrices finished while the third is being dequantized, with float32 temporaries) or the
    biggest non-expert matrix. The fused kernels (CUDA with Triton, runtime.kernels) never
    materialise a matrix to decode, and a prefill dequantizes one matrix at a time into one
    reused scratch buffer (runtime.kernels.prefill.scratch) in the compute dtype, then keeps a
    token chunk's w1 out, w3 out and their product: for Mixtral-8x7B at 2 bytes that is 0.27 GB
    (the lm_head's scratch) where the plain path needs 1.0 GB. (The offloading engine asks
    kernels.fused_expert_ffn for that one-matrix scratch: prompt_pair=False.)"""
    c = header.config
    H, I, V = c.hidden_size, c.intermediate_size, c.vocab_size
    T = max(1, min(prefill_tokens, context_tokens))
    if fused:
        numels = [H * I] + [_numel(t.shape) for t in header.tensors if t.spec.quantized]
        expert = max(numels) * dtype_bytes + 3 * T * I * dtype_bytes
        other = 0
    else:
        spec = header.recipe["experts"]
        expert = 2 * H * I * dtype_bytes + _dequant_transient(H * I, spec, dtype_bytes)
        other = max((_dequant_transient(_numel(t.shape), t.spec, dtype_bytes)
                     for t in header.tensors if t.spec.quantized), default=0)
    # residual, normed input, q/k/v/o, two FFN intermediates and the float32 logits of T tokens,
    # and one layer's attention scores (float32, all heads, T x context)
    acts = T * (8 * H + 3 * I) * 4 + T * V * 4 + c.num_attention_heads * T * context_tokens * 4
    return max(expert, other) + acts


def grouped_prompt_extra(header: Header, dtype_bytes: int, chunk: int) -> int:
    """Bytes the resident prompt path's scratch holds beyond the one matrix workspace_bytes
    counts: runtime.kernels.grouped_prompt_ffn dequantizes the w1 and w3 of `chunk` of a
    layer's experts at once (kernels.prompt_chunk_experts; Mixtral-8x7B at 2 bytes: four,
    0.94 GB, 0.82 GB more than one matrix). Only a model with every expert resident takes
    that path; the offloading engine keeps to one matrix."""
    c = header.config
    matrix = c.hidden_size * c.intermediate_size * dtype_bytes
    return max(0, 2 * min(chunk, c.num_local_experts) * matrix - matrix)


def min_expert_slots(policy: str, layers: int, top_k: int) -> int:
    """The fewest expert slots a token can run in under `policy`. The planner takes a layer's
    misses in waves when its pool cannot hold them all (runtime.offload.schedule: each computed
    expert frees its slot for the next copy), so a per-layer pool ("layer", "lfu") needs one
    slot, and a shared pool ("shared", "shared-lfu") one layer's top_k, whose second copy then
    overlaps the first expert's compute. "none" holds top_k per layer (NoCache). Below top_k
    per layer a decode step's copy and compute take turns, slower, but it runs where a card
    could not run the model before (Mixtral-8x7B at 2 bits: 64 slots needed ~3.5 GiB of the
    ~6.5 a default 8 GB card plan has)."""
    if policy in SHARED_POLICIES:
        return top_k
    if policy == "none":
        return layers * top_k
    return layers


def plan_memory(
    header: Header,
    budget: int,
    *,
    context_tokens: int,
    dtype_bytes: int = 2,
    prefill_tokens: int = 512,
    reserve_bytes: int = 0,
    dequantize_at_load: bool = False,
    fused: bool = False,
    non_expert: int | None = None,
    embed_on_host: bool = False,
    option: str = "--gpu-memory",
    source: str = "the model",
    policy: str = "layer",
) -> MemoryPlan:
    """The plan for `budget` bytes, or a ConfigError naming the smallest budget that works.

    `non_expert` overrides the header estimate (e.g. with what a loaded model really holds);
    `fused`: the device runs the fused kernels (see workspace_bytes); `embed_on_host`: see
    non_expert_bytes; `policy`: the cache policy, which sets the fewest slots (min_expert_slots)."""
    c = header.config
    rs = header.expert_layout.record_size
    total = c.num_hidden_layers * c.num_local_experts
    fixed = dict(
        non_expert_bytes=non_expert if non_expert is not None else non_expert_bytes(header, dtype_bytes, dequantize_at_load, context_tokens, embed_on_host),
        kv_cache_bytes=kv_cache_bytes(header, context_tokens, dtype_bytes),
        workspace_bytes=workspace_bytes(header, context_tokens, dtype_bytes, prefill_tokens, fused),
        reserve_bytes=reserve_bytes,
    )
    if policy not in POLICIES:
        raise ConfigError(f"--cache-policy {policy!r} is not one of {', '.join(POLICIES)}")
    min_slots = min_expert_slots(policy, c.num_hidden_layers, c.num_experts_per_tok)
    left = budget - sum(fixed.values())
    n_slots = min(total, max(0, left) // rs)
    plan = MemoryPlan(budget=budget, record_size=rs, n_slots=n_slots, min_slots=min_slots, total_experts=total,
                      embed_on_host=embed_on_host and not c.tie_word_embeddings, policy=policy, **fixed)
    if n_slots < min_slots:
        per = "one layer's top-k, in one pool" if policy in SHARED_POLICIES else (
            f"{c.num_experts_per_tok} per layer" if policy == "none" else "one per layer")
        hint = f"pass --gpu-memory {_ceil_size(plan.min_budget)} or more, or allocate a shorter context (--ctx)"
        shared_min = min_expert_slots("shared-lfu", c.num_hidden_layers, c.num_experts_per_tok)
        if policy not in SHARED_POLICIES and n_slots >= shared_min:
            # fewer slots than layers still run in one pool; by frequency it keeps the busiest
            # experts of all layers (BENCHMARKS.md section 31)
            hint += ", or run with --cache-policy shared-lfu, which needs only " + _ceil_size(plan.fixed_bytes + shared_min * rs)
        raise ConfigError(
            f"{option} {format_size(budget)} is too small for {source}: it needs "
            f"{format_size(plan.fixed_bytes)} besides the experts (weights {format_size(fixed['non_expert_bytes'])}, "
            f"KV cache {format_size(fixed['kv_cache_bytes'])} for {context_tokens} tokens, workspace "
            f"{format_size(fixed['workspace_bytes'])}, reserve {format_size(reserve_bytes)}) plus "
            f"{min_slots} expert slots of {format_size(rs)} ({per}, --cache-policy {policy}); "
            f"the smallest budget that works is {_ceil_size(plan.min_budget)}",
            hint=hint,
        )
    return plan


def split_slots(n_slots: int, layers: int) -> list[int]:
    """Slots per layer for the per-layer policy: as even as possible, the remainder to the
    first layers."""
    base, extra = divmod(n_slots, layers)
    return [base + (1 if L < extra else 0) for L in range(layers)]
