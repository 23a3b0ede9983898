"""The importance matrix: E[x_j^2] of each quantized matrix's input columns over a calibration
text (`moe-pack imatrix`), by which `moe-pack quantize --imatrix` weighs each weight's error
(quantize/fit.py). llama.cpp's `llama-imatrix` and `llama-quantize --imatrix` do the same job.

It is measured by running a .moepack file's own model (moe-pack's runtime) over the text: a
16/16 or 4/4 file of the same checkpoint. Inputs seen:
- q, k and v: the input norm's output, every token;
- o: the attention output, every token;
- an expert's w1 and w3: the post-attention norm's output, the tokens routed to it;
- its w2: h = silu(w1 x) * (w3 x) of those tokens, from the file's w1 and w3.
The embeddings, routers and lm_head are left out: no recipe default quantizes them.

The file is safetensors, written in one go by name order (the same run gives the same bytes).
For every matrix NAME (the .moepack names: model.layers.L.self_attn.q_proj.weight,
model.layers.L.block_sparse_moe.experts.E.w2.weight, ...): NAME.in_sq_mean F32 [columns], the
mean of x_j^2 over the rows seen, and NAME.rows I64 [1], how many. Metadata: format
"moe-pack imatrix", version "1", tokens, text_sha256, model (the file it was measured on).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from formats.errors import ConfigError, MoepackError
from formats.reader import MoepackFile

from .tensors import expert_matrix_name

FORMAT, VERSION = "moe-pack imatrix", "1"
MEAN, ROWS = ".in_sq_mean", ".rows"
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj")  # all three read the input norm's output
# x rows held for w2's inputs before the experts' h are computed (bytes of float32)
HOLD_BYTES = 1 << 30


class ImatrixError(MoepackError):
    """An importance matrix that cannot be used."""


@dataclass(frozen=True)
class Imatrix:
    """name -> (E[x^2] per input column, float32 [cols]; rows seen), with provenance."""

    entries: dict[str, tuple[np.ndarray, int]]
    tokens: int
    text_sha256: str
    model: str

    def importance(self, name: str, cols: int, source: str = "imatrix") -> np.ndarray | None:
        """The column importances of matrix `name` ([cols] float32), or None where it has none
        (not measured, or never routed to)."""
        hit = self.entries.get(name)
        if hit is None or hit[1] == 0:
            return None
        if hit[0].shape != (cols,):
            raise ImatrixError(f"{source}: {name} has {hit[0].shape[0]} input columns, the checkpoint's has {cols}",
                               hint="the importance matrix was measured on another model; run moe-pack imatrix "
                                    "on a file of this checkpoint")
        return hit[0]


def save(imatrix: Imatrix, path: Path) -> None:
    """Write `imatrix` to `path` atomically (a temporary beside it, renamed). The safetensors
    bytes are laid out here, not by the safetensors library, whose metadata order varies from
    run to run: here the header's keys are sorted and the data follows in that order, so the
    same importances give the same bytes."""
    tensors = {}
    for name in sorted(imatrix.entries):
        mean, rows = imatrix.entries[name]
        tensors[name + MEAN] = np.ascontiguousarray(mean, dtype="<f4")
        tensors[name + ROWS] = np.array([rows], dtype="<i8")
    model = imatrix.model.encode("utf-8", "replace").decode("utf-8")  # a file name need not be UTF-8
    header: dict = {"__metadata__": {"format": FORMAT, "version": VERSION, "tokens": str(imatrix.tokens),
                                     "text_sha256": imatrix.text_sha256, "model": model}}
    offset = 0
    for key in sorted(tensors):
        a = tensors[key]
        header[key] = {"dtype": "F32" if a.dtype.kind == "f" else "I64", "shape": list(a.shape),
                       "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    fd, name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for key in sorted(tensors):
                f.write(tensors[key].tobytes())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 is for the temporary, not the result
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path) -> Imatrix:
    """Read and check an importance matrix: its metadata, every entry's pair of tensors, their
    dtypes and shapes, finite non-negative means and non-negative row counts."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise ImatrixError(f"{path}: no such importance matrix", hint="make one with moe-pack imatrix FILE TEXT -o OUT")
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                if f.get_slice(k).get_dtype() not in ("F32", "I64"):
                    raise ImatrixError(f"{path}: {k} is {f.get_slice(k).get_dtype()}; an importance matrix holds "
                                       "F32 means and I64 row counts", hint="the file is damaged; make it again")
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise ImatrixError(f"{path}: not a safetensors file ({e})",
                           hint="pass the file moe-pack imatrix wrote") from None
    if meta.get("format") != FORMAT:
        raise ImatrixError(f"{path}: not a moe-pack importance matrix (metadata format {meta.get('format')!r})",
                           hint="make one with moe-pack imatrix FILE TEXT -o OUT")
    if meta.get("version") != VERSION:
        raise ImatrixError(f"{path}: importance matrix version {meta.get('version')!r}, this moe-pack reads {VERSION}",
                           hint="make it again with this moe-pack's imatrix command")
    try:
        tokens = int(meta.get("tokens", ""))
    except ValueError:
        raise ImatrixError(f"{path}: metadata tokens {meta.get('tokens')!r} is not an integer",
                           hint="the file is damaged; make it again") from None
    entries = {}
    for key, arr in arrays.items():
        if key.endswith(ROWS):
            if key[: -len(ROWS)] + MEAN not in arrays:
                raise ImatrixError(f"{path}: {key} has no {MEAN} beside it", hint="the file is damaged; make it again")
            continue
        if not key.endswith(MEAN):
            raise ImatrixError(f"{path}: unexpected tensor {key}", hint="the file is damaged; make it again")
        name = key[: -len(MEAN)]
        rows = arrays.get(name + ROWS)
        if rows is None or rows.dtype != np.int64 or rows.shape != (1,) or int(rows[0]) < 0:
            raise ImatrixError(f"{path}: {name}{ROWS} is missing or not one non-negative int64",
                               hint="the file is damaged; make it again")
        if arr.dtype != np.float32 or arr.ndim != 1 or not np.isfinite(arr).all() or (arr < 0).any():
            raise ImatrixError(f"{path}: {key} is not a 1-D float32 vector of finite non-negative values",
                               hint="the file is damaged; make it again")
        entries[name] = (arr, int(rows[0]))
    return Imatrix(entries=entries, tokens=tokens, text_sha256=str(meta.get("text_sha256", "")),
                   model=str(meta.get("model", "")))


def describe(imatrix: Imatrix, path: Path) -> str:
    """What goes into the header's quantizer.method_version: the file and what it measured."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    return f"imatrix {Path(path).name} sha256:{digest} ({imatrix.tokens} tokens of text sha256:{imatrix.text_sha256[:16]})"


# ------------------------------------------------------------------------------ measuring


class _Sums:
    """Per-name sums of x^2 over rows (float64, on the host) and row counts."""

    def __init__(self):
        self.sq: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}

    def add(self, names: tuple[str, ...], x: torch.Tensor) -> None:
        """x [T, cols]'s rows under each of `names`: matrices that read the same input (q, k and
        v; an expert's w1 and w3) share one sum of squares per call."""
        s = x.detach().to(torch.float64).square().sum(0).cpu()
        for name in names:
            self.sq[name] = self.sq[name] + s if name in self.sq else s.clone()
            self.rows[name] = self.rows.get(name, 0) + x.shape[0]

    def means(self) -> dict[str, tuple[np.ndarray, int]]:
        return {n: ((s / max(self.rows[n], 1)).to(torch.float32).numpy(), self.rows[n]) for n, s in self.sq.items()}


class _Recorder(nn.Module):
    """`inner` unchanged, with its input (output=False) or output rows added to `sums` under `names`."""

    def __init__(self, inner: nn.Module, sums: _Sums, names: tuple[str, ...], output: bool):
        super().__init__()
        self.inner, self.sums, self.names, self.output = inner, sums, names, output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        self.sums.add(self.names, y if self.output else x)
        return y


class _ExpertInputs:
    """An expert backend that adds each routed expert's inputs to `sums`, then delegates. w2's
    input needs the expert's w1 and w3: x rows are held per layer, and every HOLD_BYTES (and at
    the end) each expert's w1 and w3 are dequantized once for all its held rows."""

    def __init__(self, inner, file: MoepackFile, sums: _Sums):
        self.inner, self.file, self.sums = inner, file, sums
        self.held: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.held_bytes = 0

    def forward(self, layer: int, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        # x: [T, H], topk_idx: [T, k]
        for e in torch.unique(topk_idx).tolist():
            rows = x[(topk_idx == e).any(dim=1)].float()
            self.sums.add((expert_matrix_name(layer, e, "w1"), expert_matrix_name(layer, e, "w3")), rows)
            self.held.setdefault((layer, e), []).append(rows)
            self.held_bytes += rows.numel() * 4
        if self.held_bytes > HOLD_BYTES:
            self.flush()
        return self.inner.forward(layer, x, topk_idx, topk_w)

    def flush(self) -> None:
        from runtime.dequant import component_tensors, dequantize

        layout = self.file.header.expert_layout
        for (layer, e), parts in sorted(self.held.items()):
            x = torch.cat(parts)  # [n, H] float32
            record = torch.from_numpy(np.array(self.file.expert_bytes(layer, e))).to(x.device)

            def w(name: str) -> torch.Tensor:
                m = layout.matrix(name)
                return dequantize(component_tensors(record, m.shape, m.spec, base=m.offset), m.shape, m.spec,
                                  torch.float32)
            h = torch.nn.functional.silu(x @ w("w1").T) * (x @ w("w3").T)  # [n, I]
            self.sums.add((expert_matrix_name(layer, e, "w2"),), h)
        self.held.clear()
        self.held_bytes = 0

    def stats(self) -> dict:
        return self.inner.stats()

    def reset_stats(self) -> None:
        self.inner.reset_stats()


def text_windows(tok, ids: list[int], ctx: int) -> list[list[int]]:
    """The calibration ids in windows of at most `ctx` tokens, each of at least 2.

    Each window starts as the model's sequences do (runtime.perplexity's windows too): with
    BOS where the tokenizer adds it, whose activations inference sees once per sequence."""
    bos = [tok.bos_id] if tok.info.add_bos_token and tok.bos_id is not None else []
    step = ctx - len(bos)
    # a one-token window would take the decode step's path, which the .moepack recorders do not see
    windows = [bos + ids[s:s + step] for s in range(0, len(ids), step) if len(bos + ids[s:s + step]) >= 2]
    if not windows:
        raise ConfigError("the calibration text has fewer than 2 tokens", hint="pass a file with some text in it")
    return windows


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def measure(path: Path, text: str, *, ctx: int = 512, max_tokens: int | None = 8192, device: str = "auto",
            progress: bool = True) -> Imatrix:
    """The importance matrix of the model in .moepack `path` over `text`, in windows of `ctx`
    tokens (float32 activations; the CPU kernel rounds x to int16, not int8)."""
    from runtime.cpu_native import activations
    from runtime.device import resolve_device

    from .calibrate import open_text

    file, tok, ids, ctx = open_text(path, text, ctx, max_tokens, least=2)
    try:
        windows = text_windows(tok, ids, ctx)
        dev = resolve_device(device)
        with activations("int16"):  # a CPU model's default int8 would add its rounding to every input
            return _measure(file, path, text, windows, dev, ctx, progress)
    except torch.OutOfMemoryError:
        raise MoepackError(f"out of GPU memory running {path}",
                           hint="measure with a 4/4 file of the checkpoint, or --device cpu") from None
    finally:
        file.close()


def _measure(file: MoepackFile, path: Path, text: str, windows: list, dev, ctx: int, progress: bool) -> Imatrix:
    from runtime.loader import load_model

    model, _ = load_model(file, dev, torch.float32, ctx=ctx, dequantize_at_load=True)
    sums = _Sums()
    for layer_index, layer in enumerate(model.layers):
        prefix = f"model.layers.{layer_index}.self_attn."
        layer.input_norm = _Recorder(layer.input_norm, sums, tuple(prefix + p + ".weight" for p in ATTENTION_INPUTS),
                                     output=True)
        layer.attn.o_proj = _Recorder(layer.attn.o_proj, sums, (prefix + "o_proj.weight",), output=False)
    experts = _ExpertInputs(model.experts, file, sums)
    model.experts = experts
    tokens = sum(len(w) for w in windows)
    with torch.inference_mode(), tqdm(total=tokens, unit="tok", desc="imatrix", disable=not progress) as bar:
        for window in windows:
            model(torch.tensor(window, dtype=torch.long), 0, last_only=True)
            bar.update(len(window))
        experts.flush()
    return Imatrix(entries=sums.means(), tokens=tokens, text_sha256=text_sha256(text),
                   model=Path(path).name)


_EXPERT_KEY = re.compile(r"model\.layers\.\d+\.block_sparse_moe\.experts\.\d+\.w[123]\.weight")


def coverage(imatrix: Imatrix) -> tuple[int, int]:
    """(expert matrices, other matrices) with rows seen, for the CLI's summary line."""
    seen = [n for n, (_, rows) in imatrix.entries.items() if rows > 0]
    experts = sum(1 for n in seen if _EXPERT_KEY.fullmatch(n))
    return experts, len(seen) - experts
