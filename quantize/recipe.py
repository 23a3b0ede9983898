"""The quantization recipe: CLI options -> a validated `formats.Recipe` keyed by tensor role.

Every check names the CLI option at fault, because a bad group size found after an hour of
quantizing is an hour lost: `QuantRecipe.build(config)` runs before any tensor is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from formats.errors import ConfigError
from formats.header import ModelConfig, Recipe
from formats.qtensor import META_BITS, WEIGHT_BITS, QuantSpec

# HQQ settings of the reference system (FACTS.md section 2): small groups at 2 bits, where a
# group's range matters most; 8-bit scale/zero in groups of 128 (2/3-bit) or 256 (4/8-bit).
# Experts at 2 and 3 bits store scale/zero as 4-bit codes instead (format version 2): 16% fewer
# bytes per 2-bit expert for +1% weight error and no perplexity cost measured; at 4 bits the
# same codes cost +10% weight error on real attention (BENCHMARKS.md section 10), so 4/8-bit
# roles keep 8-bit codes.
DEFAULT_EXPERT_META_BITS = {2: 4, 3: 4}
DEFAULT_GROUP_SIZE = {2: 16, 3: 64, 4: 64, 8: 64}
DEFAULT_META_GROUP_SIZE = {2: 128, 3: 128, 4: 256, 8: 256}

_BITS_CHOICES = ", ".join(str(b) for b in WEIGHT_BITS)


@dataclass(frozen=True)
class RoleOption:
    """The options of one quantizable role, with the CLI names used in error messages."""

    option: str  # e.g. "--attn-bits"
    group_option: str  # e.g. "--attn-group-size"
    bits: int
    group_size: int | None = None  # None: the default for `bits`
    meta_bits: int = 8


@dataclass(frozen=True)
class QuantRecipe:
    """What the user asked for. `build` turns it into a formats.Recipe for one model config."""

    attn_bits: int = 4
    expert_bits: int = 2
    lm_head_bits: int = 16
    attn_group_size: int | None = None
    expert_group_size: int | None = None
    lm_head_group_size: int | None = None
    meta_bits: int = 8
    expert_meta_bits: int | None = None  # None: DEFAULT_EXPERT_META_BITS when meta_bits is 8, else meta_bits
    meta_group_size: int | None = None

    def __post_init__(self) -> None:
        for role in self._roles():
            if role.bits not in WEIGHT_BITS:
                raise ConfigError(
                    f"{role.option} {role.bits} is not supported",
                    hint=f"choose one of {_BITS_CHOICES} (16 keeps float16)",
                )
            if role.bits == 16 and role.group_size is not None:
                raise ConfigError(
                    f"{role.group_option} {role.group_size} has no effect with {role.option} 16",
                    hint=f"drop {role.group_option}, or choose fewer bits",
                )
            if role.group_size is not None and (role.group_size < 8 or role.group_size % 8):
                raise ConfigError(
                    f"{role.group_option} {role.group_size} must be a positive multiple of 8",
                    hint="typical values are 16, 32, 64 or 128",
                )
        for option, value in (("--meta-bits", self.meta_bits), ("--expert-meta-bits", self.expert_meta_bits)):
            if value is not None and value not in META_BITS:
                raise ConfigError(
                    f"{option} {value} is not supported",
                    hint="choose 8 (quantized scale/zero, smaller), 16 (hqq's float16 scale/zero) or 4 (smallest)",
                )
        if self.meta_group_size is not None:
            if self.meta_bits == 16 and self.expert_meta_bits in (None, 16):
                raise ConfigError(
                    f"--meta-group-size {self.meta_group_size} has no effect with --meta-bits 16",
                    hint="drop --meta-group-size, or use --meta-bits 8",
                )
            if self.meta_group_size < 1:
                raise ConfigError(f"--meta-group-size {self.meta_group_size} must be positive", hint="the default is 128 or 256")

    def _roles(self) -> tuple[RoleOption, ...]:
        expert_meta = self.expert_meta_bits
        if expert_meta is None:
            expert_meta = DEFAULT_EXPERT_META_BITS.get(self.expert_bits, 8) if self.meta_bits == 8 else self.meta_bits
        return (
            RoleOption("--attn-bits", "--attn-group-size", self.attn_bits, self.attn_group_size, self.meta_bits),
            RoleOption("--expert-bits", "--expert-group-size", self.expert_bits, self.expert_group_size, expert_meta),
            RoleOption("--lm-head-bits", "--lm-head-group-size", self.lm_head_bits, self.lm_head_group_size, self.meta_bits),
        )

    def _spec(self, role: RoleOption, dims: dict[str, int]) -> QuantSpec:
        """The spec of one role; `dims` names the input dimensions its group size must divide."""
        if role.bits == 16:
            return QuantSpec(16)
        g = role.group_size if role.group_size is not None else DEFAULT_GROUP_SIZE[role.bits]
        for what, n in dims.items():
            if n % g:
                divisors = [d for d in (16, 32, 64, 128, 256) if n % d == 0 and all(m % d == 0 for m in dims.values())]
                raise ConfigError(
                    f"{role.group_option} {g} does not divide the model's {what} ({n})",
                    hint=f"choose a group size that divides {' and '.join(f'{k} {v}' for k, v in dims.items())}"
                    + (f", e.g. {divisors[-1]}" if divisors else ""),
                )
        if role.meta_bits == 16:
            return QuantSpec(role.bits, g, 16, 0)
        mg = self.meta_group_size if self.meta_group_size is not None else DEFAULT_META_GROUP_SIZE[role.bits]
        return QuantSpec(role.bits, g, role.meta_bits, mg)

    def build(self, config: ModelConfig) -> Recipe:
        """The per-role recipe for `config`. Router, norms and embeddings stay float16 (format v1)."""
        H, I = config.hidden_size, config.intermediate_size
        attn_out = config.num_attention_heads * config.head_dim  # o_proj's input dimension
        attn, experts, lm_head = self._roles()
        attn_dims = {"hidden size": H} if attn_out == H else {"hidden size": H, "attention width (heads x head_dim)": attn_out}
        return Recipe({
            "embeddings": QuantSpec(16),
            "attention": self._spec(attn, attn_dims),
            "norms": QuantSpec(16),
            "router": QuantSpec(16),
            "experts": self._spec(experts, {"hidden size": H, "intermediate size": I}),
            "lm_head": self._spec(lm_head, {"hidden size": H}),
        })

    def describe(self) -> str:
        return f"attention {self.attn_bits}-bit, experts {self.expert_bits}-bit, lm_head {self.lm_head_bits}-bit"
