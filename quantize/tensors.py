"""Where every matrix of the .moepack file comes from, and reading it one tensor at a time.

`plan_records` maps the checkpoint's tensor names (the hub's per-expert names, or the fused
`mlp.experts.gate_up_proj` / `down_proj` that transformers >= 5 may save) onto the file's
records in file order, checking every name, dtype and shape from the safetensors headers
alone, so a bad checkpoint fails in a second, not after an hour of quantizing.
`load` then reads exactly one tensor (or one expert's slice of a fused tensor).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from formats.errors import SourceError
from formats.header import ModelConfig
from formats.layout import expected_tensors, expert_shapes
from formats.spec import EXPERT_MATRICES

INDEX_FILE = "model.safetensors.index.json"
SUPPORTED_DTYPES = ("F16", "BF16", "F32")
_HEADER_CAP = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class TensorRef:
    """One matrix in the checkpoint: a whole tensor, or `index` into a fused tensor."""

    name: str  # the checkpoint's tensor name
    shard: str  # file name inside the checkpoint folder
    shape: tuple[int, ...]  # of the matrix this ref yields
    index: tuple = ()  # e.g. (expert, slice(0, I)) for w1 in gate_up_proj; () = whole tensor

    def label(self) -> str:
        if not self.index:
            return f"{self.name} ({self.shard})"
        parts = [str(i) if isinstance(i, int) else f"{i.start}:{i.stop}" for i in self.index]
        return f"{self.name}[{', '.join(parts)}] ({self.shard})"


@dataclass(frozen=True)
class TensorItem:
    """A non-expert record."""

    name: str  # the name in the .moepack file (HF per-expert naming)
    role: str
    layer: int | None
    shape: tuple[int, ...]
    ref: TensorRef


@dataclass(frozen=True)
class ExpertItem:
    """An expert record: w1, w3, w2 in EXPERT_MATRICES order."""

    layer: int
    expert: int
    refs: tuple[tuple[str, TensorRef], ...]

    @property
    def name(self) -> str:
        return f"model.layers.{self.layer}.block_sparse_moe.experts.{self.expert}"

    def matrix_name(self, matrix: str) -> str:
        return expert_matrix_name(self.layer, self.expert, matrix)


def expert_matrix_name(layer: int, expert: int, matrix: str) -> str:
    """An expert matrix's name where one matrix is meant (an importance matrix, a fit):
    its record's name, the matrix, .weight."""
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{matrix}.weight"


def quantized_matrices(plan: list, recipe) -> dict[str, tuple[int, int | None]]:
    """name -> (input columns, layer; None for lm_head) of every matrix of `plan` that the file
    recipe quantizes."""
    out: dict[str, tuple[int, int | None]] = {}
    for item in plan:
        if isinstance(item, TensorItem):
            if recipe[item.role].quantized and len(item.shape) == 2:
                out[item.name] = (item.shape[1], item.layer)
        elif recipe["experts"].quantized:
            for m, ref in item.refs:
                out[item.matrix_name(m)] = (ref.shape[1], item.layer)
    return out


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from a shard's JSON header, without touching tensor data."""
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise SourceError(f"{path}: too short to be a safetensors file", hint="the shard is damaged; download it again")
            (n,) = struct.unpack("<Q", raw_len)
            if n > _HEADER_CAP:
                raise SourceError(f"{path}: not a safetensors file (header length {n})", hint="the shard is damaged; download it again")
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{path}: no such shard", hint="the checkpoint is incomplete; download the missing shard") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SourceError(f"{path}: the safetensors header is not valid JSON", hint="the shard is damaged; download it again") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path}: the safetensors header is not a JSON object", hint="the shard is damaged; download it again")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            out[name] = (str(info["dtype"]), tuple(int(d) for d in info["shape"]))
        except (TypeError, KeyError, ValueError):
            raise SourceError(f"{path}: bad header entry for tensor {name}", hint="the shard is damaged; download it again") from None
    return out


Headers = dict[str, dict[str, tuple[str, tuple[int, ...]]]]  # shard -> tensor name -> (dtype, shape)


class ShardIndex:
    """Which shard holds which tensor, with its dtype and shape (headers only). `headers`
    (shard -> name -> (dtype, shape)) stands in for the shards' files when they are not
    downloaded yet (quantize/streaming.py)."""

    def __init__(self, folder: Path, headers: Headers | None = None):
        self.folder = folder
        index_path = folder / INDEX_FILE
        self.claimed: dict[str, str] = {}  # what the index file says, to name the shard in errors
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
                self.claimed = {str(k): str(v) for k, v in weight_map.items()}
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise SourceError(f"{index_path}: not a valid safetensors index (no weight_map)", hint="the file is damaged; download it again") from None
            shards = sorted(set(self.claimed.values()))
        elif headers is not None:
            shards = sorted(headers)
        else:
            shards = sorted(p.name for p in folder.glob("*.safetensors"))
            if not shards:
                raise SourceError(
                    f"{folder}: no *.safetensors files",
                    hint="moe-pack reads safetensors checkpoints; convert .bin/.pt weights with transformers' save_pretrained",
                )
        self.shards = shards
        self.entries: dict[str, tuple[str, str, tuple[int, ...]]] = {}  # name -> (shard, dtype, shape)
        for shard in shards:
            if headers is not None and shard not in headers:
                raise SourceError(f"{INDEX_FILE} lists shard {shard}, which the repo's safetensors headers do not have",
                                  hint="the checkpoint repo is incomplete")
            header = headers[shard] if headers is not None else read_safetensors_header(folder / shard)
            for name, (dtype, shape) in header.items():
                if name not in self.claimed or self.claimed[name] == shard:
                    self.entries.setdefault(name, (shard, dtype, shape))

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def ref(self, name: str, shape: tuple[int, ...] | None = None, index: tuple = (), full_shape: tuple[int, ...] | None = None) -> TensorRef:
        """A checked ref: the tensor exists, has a float dtype and the shape the config implies."""
        if name not in self.entries:
            if name in self.claimed:
                raise SourceError(
                    f"tensor {name} is listed in {INDEX_FILE} under shard {self.claimed[name]}, but that shard does not contain it",
                    hint="the checkpoint is incomplete or mixed up; download the shard again",
                )
            where = INDEX_FILE if self.claimed else ", ".join(self.shards)
            raise SourceError(f"tensor {name} is missing from the checkpoint ({where})", hint="is this a complete Mixtral checkpoint?")
        shard, dtype, actual = self.entries[name]
        if dtype not in SUPPORTED_DTYPES:
            raise SourceError(
                f"tensor {name} in shard {shard} has dtype {dtype}",
                hint=f"moe-pack quantizes float checkpoints ({', '.join(SUPPORTED_DTYPES)}); start from the original weights",
            )
        want = full_shape if full_shape is not None else shape
        if want is not None and actual != tuple(want):
            raise SourceError(
                f"tensor {name} in shard {shard} has shape {list(actual)}, config.json implies {list(want)}",
                hint="config.json and the weights do not belong together",
            )
        return TensorRef(name, shard, tuple(shape if shape is not None else actual), index)


def _expert_refs(idx: ShardIndex, config: ModelConfig, L: int, E: int) -> tuple[tuple[str, TensorRef], ...]:
    shapes = expert_shapes(config)
    per_expert = f"model.layers.{L}.block_sparse_moe.experts.{E}."
    fused = f"model.layers.{L}.mlp.experts."
    if per_expert + "w1.weight" in idx or fused + "gate_up_proj" not in idx:
        return tuple((m, idx.ref(f"{per_expert}{m}.weight", shapes[m])) for m in EXPERT_MATRICES)
    # transformers' MixtralExperts: gate, up = linear(x, gate_up_proj[e]).chunk(2) -> rows [0, I) are
    # w1 (gate), rows [I, 2I) are w3 (up); its hub->fused converter concatenates [w1, w3] the same way.
    I, H, n = config.intermediate_size, config.hidden_size, config.num_local_experts
    gate_up, down = fused + "gate_up_proj", fused + "down_proj"
    return (
        ("w1", idx.ref(gate_up, shapes["w1"], (E, slice(0, I)), full_shape=(n, 2 * I, H))),
        ("w3", idx.ref(gate_up, shapes["w3"], (E, slice(I, 2 * I)), full_shape=(n, 2 * I, H))),
        ("w2", idx.ref(down, shapes["w2"], (E,), full_shape=(n, H, I))),
    )


def plan_records(folder: Path, config: ModelConfig, headers: Headers | None = None) -> list[TensorItem | ExpertItem]:
    """Every record of the output in file order: embeddings; per layer its tensors then its
    experts 0..E-1; then model.norm and lm_head. `headers`: see ShardIndex."""
    idx = ShardIndex(folder, headers)
    by_layer: dict[int | None, list[TensorItem]] = {}
    for name, (role, layer, shape) in expected_tensors(config).items():
        src = name
        if role == "router" and name not in idx and name.replace(".block_sparse_moe.", ".mlp.") in idx:
            src = name.replace(".block_sparse_moe.", ".mlp.")  # transformers >= 5 naming
        by_layer.setdefault(layer, []).append(TensorItem(name, role, layer, shape, idx.ref(src, shape)))
    head = [t for t in by_layer[None] if t.name == "model.embed_tokens.weight"]
    plan: list[TensorItem | ExpertItem] = list(head)
    for L in range(config.num_hidden_layers):
        plan += by_layer[L]
        plan += [ExpertItem(L, E, _expert_refs(idx, config, L, E)) for E in range(config.num_local_experts)]
    plan += [t for t in by_layer[None] if t.name != "model.embed_tokens.weight"]
    return plan


def load(folder: Path, ref: TensorRef):
    """Read one tensor (a torch.Tensor in the checkpoint's dtype) and nothing else.

    The shard is opened per call so no memory map outlives the read: resident memory stays
    one tensor, not the page cache of every shard touched so far.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(folder / ref.shard), framework="pt") as f:  # pt: numpy has no bfloat16
            if ref.index:
                return f.get_slice(ref.name)[ref.index]
            return f.get_tensor(ref.name)
    except SafetensorError as e:
        raise SourceError(f"cannot read tensor {ref.label()}: {e}", hint="the shard is damaged; download it again") from None
