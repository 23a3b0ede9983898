"""The JSON header: typed, frozen dataclasses and their strict JSON (de)serialisation
(docs/FORMAT.md, section "Header")."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import MappingProxyType

from . import schema as S
from .errors import ConfigError, HeaderError
from .qtensor import DTYPES, Component, QuantSpec, WEIGHT_BITS, matrix_layout
from .spec import EXPERT_MATRICES, ROLES


@dataclass(frozen=True)
class ModelConfig:
    """Everything the runtime needs to build a Mixtral model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_local_experts={self.num_local_experts}]"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    _INTS = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "max_position_embeddings",
    )

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, d) -> "ModelConfig":
        fields = tuple(cls.__dataclass_fields__)
        S.obj(d, "config", required=fields)
        kw = {k: S.integer(d[k], f"config.{k}", lo=1, hi=2**31) for k in cls._INTS}
        kw["rms_norm_eps"] = S.number(d["rms_norm_eps"], "config.rms_norm_eps", positive=True)
        kw["rope_theta"] = S.number(d["rope_theta"], "config.rope_theta", positive=True)
        kw["tie_word_embeddings"] = S.boolean(d["tie_word_embeddings"], "config.tie_word_embeddings")
        kw["sliding_window"] = S.optional(d["sliding_window"], "config.sliding_window", lambda v, w: S.integer(v, w, lo=1))
        try:
            return cls(**kw)
        except ConfigError as e:
            raise HeaderError(f"header config: {e}") from None


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer travels inside the file so `runtime.generate x.moepack` needs no other input."""

    tokenizer_json: str | None = None
    chat_template: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    add_bos_token: bool = True

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_json(cls, d) -> "TokenizerInfo":
        S.obj(d, "tokenizer", required=tuple(cls.__dataclass_fields__))
        return cls(
            tokenizer_json=S.optional(d["tokenizer_json"], "tokenizer.tokenizer_json", S.string),
            chat_template=S.optional(d["chat_template"], "tokenizer.chat_template", S.string),
            bos_token_id=S.optional(d["bos_token_id"], "tokenizer.bos_token_id", S.integer),
            eos_token_ids=tuple(
                S.integer(v, f"tokenizer.eos_token_ids[{i}]") for i, v in enumerate(S.array(d["eos_token_ids"], "tokenizer.eos_token_ids"))
            ),
            add_bos_token=S.boolean(d["add_bos_token"], "tokenizer.add_bos_token"),
        )


@dataclass(frozen=True)
class QuantizerInfo:
    name: str
    version: str
    method: str
    method_version: str
    source: str

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, d) -> "QuantizerInfo":
        S.obj(d, "quantizer", required=tuple(cls.__dataclass_fields__))
        return cls(**{k: S.string(d[k], f"quantizer.{k}") for k in cls.__dataclass_fields__})


def spec_from_json(d, where: str) -> QuantSpec:
    S.obj(d, where, required=("bits",), optional=("group_size", "meta_bits", "meta_group_size"))
    bits = S.integer(d["bits"], f"{where}.bits")
    if bits == 16:
        S.obj(d, where, required=("bits",))
        return QuantSpec(16)
    S.obj(d, where, required=("bits", "group_size", "meta_bits", "meta_group_size"))
    if bits not in WEIGHT_BITS:
        raise HeaderError(f"header field {where}.bits={bits} is not one of {WEIGHT_BITS}")
    try:
        return QuantSpec(
            bits,
            S.integer(d["group_size"], f"{where}.group_size"),
            S.integer(d["meta_bits"], f"{where}.meta_bits"),
            S.integer(d["meta_group_size"], f"{where}.meta_group_size"),
        )
    except ConfigError as e:
        raise HeaderError(f"header field {where}: {e}") from None


@dataclass(frozen=True)
class Recipe:
    """The quantization recipe, keyed by tensor role."""

    specs: MappingProxyType

    def __init__(self, specs: dict[str, QuantSpec]):
        missing = [r for r in ROLES if r not in specs]
        unknown = [r for r in specs if r not in ROLES]
        if missing or unknown:
            raise ConfigError(f"recipe needs exactly the roles {ROLES} (missing {missing}, unknown {unknown})")
        object.__setattr__(self, "specs", MappingProxyType({r: specs[r] for r in ROLES}))

    def __getitem__(self, role: str) -> QuantSpec:
        return self.specs[role]

    def to_json(self) -> dict:
        return {r: s.to_json() for r, s in self.specs.items()}

    @classmethod
    def from_json(cls, d) -> "Recipe":
        S.obj(d, "recipe", required=ROLES)
        return cls({r: spec_from_json(d[r], f"recipe.{r}") for r in ROLES})


def components_to_json(comps: tuple[Component, ...]) -> list:
    return [{"name": c.name, "dtype": c.dtype, "shape": list(c.shape), "offset": c.offset} for c in comps]


def components_from_json(d, where: str, shape: tuple[int, ...], spec: QuantSpec) -> tuple[Component, ...]:
    """Parse a component list and insist it equals the layout FORMAT.md derives from shape + spec."""
    items = S.array(d, where)
    comps = []
    for i, c in enumerate(items):
        w = f"{where}[{i}]"
        S.obj(c, w, required=("name", "dtype", "shape", "offset"))
        dtype = S.string(c["dtype"], f"{w}.dtype")
        if dtype not in DTYPES:
            raise HeaderError(f"header field {w}.dtype={dtype!r} is not one of {sorted(DTYPES)}")
        dims = S.array(c["shape"], f"{w}.shape")
        comps.append(Component(S.string(c["name"], f"{w}.name"), dtype, S.shape(dims, f"{w}.shape", len(dims)), S.integer(c["offset"], f"{w}.offset")))
    expected, _ = matrix_layout(shape, spec)
    if tuple(comps) != expected:
        raise HeaderError(f"header field {where} does not match the layout of a {spec.describe()} matrix of shape {list(shape)}")
    return tuple(comps)


@dataclass(frozen=True)
class TensorEntry:
    """A non-expert tensor: one aligned record. `offset` is relative to the data section."""

    name: str
    role: str
    layer: int | None
    shape: tuple[int, ...]
    spec: QuantSpec
    offset: int
    nbytes: int
    crc32: int
    rel_error: float | None = None

    @property
    def components(self) -> tuple[Component, ...]:
        return matrix_layout(self.shape, self.spec)[0]

    def to_json(self) -> dict:
        return {
            "name": self.name, "role": self.role, "layer": self.layer, "shape": list(self.shape),
            "quant": self.spec.to_json(), "components": components_to_json(self.components),
            "offset": self.offset, "nbytes": self.nbytes, "crc32": self.crc32, "rel_error": self.rel_error,
        }

    @classmethod
    def from_json(cls, d, i: int) -> "TensorEntry":
        w = f"tensors[{i}]"
        S.obj(d, w, required=("name", "role", "layer", "shape", "quant", "components", "offset", "nbytes", "crc32", "rel_error"))
        name = S.string(d["name"], f"{w}.name")
        w = f"tensors[{i}] ({name!r})"
        role = S.string(d["role"], f"{w}.role")
        if role not in ROLES or role == "experts":
            raise HeaderError(f"header field {w}.role={role!r} is not a non-expert role")
        dims = S.array(d["shape"], f"{w}.shape")
        shape = S.shape(dims, f"{w}.shape", len(dims)) if dims else ()
        spec = spec_from_json(d["quant"], f"{w}.quant")
        components_from_json(d["components"], f"{w}.components", shape, spec)
        return cls(
            name=name, role=role, layer=S.optional(d["layer"], f"{w}.layer", S.integer), shape=shape, spec=spec,
            offset=S.integer(d["offset"], f"{w}.offset"), nbytes=S.integer(d["nbytes"], f"{w}.nbytes"),
            crc32=S.integer(d["crc32"], f"{w}.crc32", hi=2**32 - 1),
            rel_error=S.optional(d["rel_error"], f"{w}.rel_error", S.number),
        )


@dataclass(frozen=True)
class MatrixLayout:
    """One matrix inside every expert record: where it starts and its components."""

    name: str
    shape: tuple[int, int]
    spec: QuantSpec
    offset: int

    @property
    def components(self) -> tuple[Component, ...]:
        return matrix_layout(self.shape, self.spec)[0]

    @property
    def nbytes(self) -> int:
        return matrix_layout(self.shape, self.spec)[1]


@dataclass(frozen=True)
class ExpertLayout:
    """The one internal layout shared by every expert record of a file."""

    record_size: int
    matrices: tuple[MatrixLayout, ...]

    def matrix(self, name: str) -> MatrixLayout:
        for m in self.matrices:
            if m.name == name:
                return m
        raise KeyError(name)

    def to_json(self) -> dict:
        return {
            "record_size": self.record_size,
            "matrices": [
                {"name": m.name, "shape": list(m.shape), "quant": m.spec.to_json(), "offset": m.offset,
                 "nbytes": m.nbytes, "components": components_to_json(m.components)}
                for m in self.matrices
            ],
        }

    @classmethod
    def from_json(cls, d) -> "ExpertLayout":
        S.obj(d, "expert_layout", required=("record_size", "matrices"))
        mats = []
        for i, m in enumerate(S.array(d["matrices"], "expert_layout.matrices")):
            w = f"expert_layout.matrices[{i}]"
            S.obj(m, w, required=("name", "shape", "quant", "offset", "nbytes", "components"))
            shape = S.shape(m["shape"], f"{w}.shape", 2)
            spec = spec_from_json(m["quant"], f"{w}.quant")
            components_from_json(m["components"], f"{w}.components", shape, spec)
            ml = MatrixLayout(S.string(m["name"], f"{w}.name"), shape, spec, S.integer(m["offset"], f"{w}.offset"))
            if S.integer(m["nbytes"], f"{w}.nbytes") != ml.nbytes:
                raise HeaderError(f"header field {w}.nbytes={m['nbytes']} != {ml.nbytes} implied by its layout")
            mats.append(ml)
        if tuple(m.name for m in mats) != EXPERT_MATRICES:
            raise HeaderError(f"header field expert_layout.matrices must be {list(EXPERT_MATRICES)} in that order")
        return cls(S.integer(d["record_size"], "expert_layout.record_size", lo=1), tuple(mats))


@dataclass(frozen=True)
class ExpertEntry:
    layer: int
    expert: int
    offset: int
    crc32: int
    rel_error: tuple[float, float, float] | None = None  # w1, w3, w2

    def to_json(self) -> dict:
        return {
            "layer": self.layer, "expert": self.expert, "offset": self.offset, "crc32": self.crc32,
            "rel_error": None if self.rel_error is None else list(self.rel_error),
        }

    @classmethod
    def from_json(cls, d, i: int) -> "ExpertEntry":
        w = f"experts[{i}]"
        S.obj(d, w, required=("layer", "expert", "offset", "crc32", "rel_error"))
        err = d["rel_error"]
        if err is not None:
            err = tuple(S.number(v, f"{w}.rel_error[{j}]") for j, v in enumerate(S.array(err, f"{w}.rel_error")))
            if len(err) != len(EXPERT_MATRICES):
                raise HeaderError(f"header field {w}.rel_error must list {len(EXPERT_MATRICES)} numbers")
        return cls(
            S.integer(d["layer"], f"{w}.layer"), S.integer(d["expert"], f"{w}.expert"),
            S.integer(d["offset"], f"{w}.offset"), S.integer(d["crc32"], f"{w}.crc32", hi=2**32 - 1), err,
        )


@dataclass(frozen=True)
class Header:
    config: ModelConfig
    tokenizer: TokenizerInfo
    quantizer: QuantizerInfo
    recipe: Recipe
    tensors: tuple[TensorEntry, ...]
    expert_layout: ExpertLayout
    experts: tuple[ExpertEntry, ...]
    data_size: int
    # Per-layer, per-expert routing counts from a calibration text (or None): lets a runtime
    # keep the most popular experts resident.
    expert_counts: tuple[tuple[int, ...], ...] | None = None
    _index: dict = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        from .layout import validate_header  # late import: layout needs the dataclasses above

        validate_header(self)
        object.__setattr__(self, "_index", {
            "tensors": {t.name: t for t in self.tensors},
            "experts": {(e.layer, e.expert): e for e in self.experts},
        })

    @property
    def format_version(self) -> int:
        """The lowest format version that stores this header (what the writer puts in the prefix)."""
        from .spec import required_version

        return required_version(self.recipe.specs.values())

    def tensor(self, name: str) -> TensorEntry:
        try:
            return self._index["tensors"][name]
        except KeyError:
            raise HeaderError(f"the file has no tensor {name!r}") from None

    def expert(self, layer: int, expert: int) -> ExpertEntry:
        return self._index["experts"][(layer, expert)]

    def to_json(self) -> dict:
        return {
            "format": "moepack",
            "config": self.config.to_json(),
            "tokenizer": self.tokenizer.to_json(),
            "quantizer": self.quantizer.to_json(),
            "recipe": self.recipe.to_json(),
            "tensors": [t.to_json() for t in self.tensors],
            "expert_layout": self.expert_layout.to_json(),
            "experts": [e.to_json() for e in self.experts],
            "data_size": self.data_size,
            "expert_counts": None if self.expert_counts is None else [list(r) for r in self.expert_counts],
        }

    def to_bytes(self) -> bytes:
        # sorted keys and fixed separators: the same header always gives the same bytes
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")

    @classmethod
    def from_json(cls, d) -> "Header":
        keys = ("format", "config", "tokenizer", "quantizer", "recipe", "tensors", "expert_layout", "experts", "data_size", "expert_counts")
        S.obj(d, "<root>", required=keys)
        if d["format"] != "moepack":
            raise HeaderError(f"header field format={d['format']!r:.40} must be \"moepack\"")
        counts = d["expert_counts"]
        if counts is not None:
            counts = tuple(
                tuple(S.integer(v, f"expert_counts[{i}][{j}]") for j, v in enumerate(S.array(row, f"expert_counts[{i}]")))
                for i, row in enumerate(S.array(counts, "expert_counts"))
            )
        return cls(
            config=ModelConfig.from_json(d["config"]),
            tokenizer=TokenizerInfo.from_json(d["tokenizer"]),
            quantizer=QuantizerInfo.from_json(d["quantizer"]),
            recipe=Recipe.from_json(d["recipe"]),
            tensors=tuple(TensorEntry.from_json(t, i) for i, t in enumerate(S.array(d["tensors"], "tensors"))),
            expert_layout=ExpertLayout.from_json(d["expert_layout"]),
            experts=tuple(ExpertEntry.from_json(e, i) for i, e in enumerate(S.array(d["experts"], "experts"))),
            data_size=S.integer(d["data_size"], "data_size"),
            expert_counts=counts,
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Header":
        try:
            d = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
        # ValueError also covers integers longer than Python's int-parsing digit limit
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            detail = " ".join(str(e).split())[:80]
            raise HeaderError(f"header is not valid UTF-8 JSON ({type(e).__name__}: {detail})") from None
        return cls.from_json(d)


def _reject_constant(name: str):
    raise HeaderError(f"header contains the non-JSON number {name}")


def _unique_keys(pairs: list) -> dict:
    # json.loads would silently keep the last of two equal keys; two readers could then disagree
    d = dict(pairs)
    if len(d) != len(pairs):
        dup = next(k for i, (k, _) in enumerate(pairs) if any(k == k2 for k2, _ in pairs[:i]))
        raise HeaderError(f"header has the key {dup!r} twice in one object")
    return d
