"""Fast synthetic .moepack files with real Mixtral-8x7B shapes, for the benchmark.

formats.synthetic.write_synthetic draws and packs every code with numpy (minutes per
layer at full size) and its writer copies the data section once more. Here packed bytes
are drawn directly: a code plane of uniform random codes *is* uniform random bytes, so
each u8 component (code planes, 8-bit scale and zero codes) is a slice of one random pool
at a random per-record offset, and only the small float components (meta, fp16 tensors)
are computed. Every record differs, every record's crc32 is computed over its real bytes
(one threaded pass), and the file is written in one sequential pass behind its header.
The result is a normal, fully valid file: MoepackFile opens it and verify() passes.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import numpy as np
from tqdm import tqdm

from formats.header import ExpertEntry, Header, ModelConfig, QuantizerInfo, Recipe, TensorEntry, TokenizerInfo
from formats.layout import expected_tensors
from formats.qtensor import QuantSpec, matrix_layout
from formats.spec import ALIGNMENT, MAGIC, PREFIX, align_up, data_offset
from formats.writer import make_expert_layout

POOL_BYTES = 256 << 20
_ZEROS = bytes(ALIGNMENT)


class _Pools:
    """Random bytes and standard-normal float32 values that records are sliced from."""

    def __init__(self, seed: int, pool_bytes: int):
        rng = np.random.default_rng([seed, 0x5EED])
        self.bytes = np.frombuffer(rng.bytes(pool_bytes), dtype=np.uint8)
        self.normal = rng.standard_normal(pool_bytes // 16, dtype=np.float32)

    def u8(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if n <= len(self.bytes) // 2:
            start = int(rng.integers(0, len(self.bytes) - n + 1))
            return self.bytes[start:start + n]
        return np.resize(np.roll(self.bytes, -int(rng.integers(0, len(self.bytes)))), n)

    def gauss(self, rng: np.random.Generator, n: int) -> np.ndarray:
        start = int(rng.integers(0, len(self.normal)))
        return np.resize(np.roll(self.normal, -start), n) if n > len(self.normal) - start else self.normal[start:start + n]


def _meta(n_meta: int, step: float, lo: float) -> np.ndarray:
    m = np.empty((n_meta, 2), dtype="<f4")
    m[:, 0], m[:, 1] = step, lo
    return m


def matrix_pieces(pools: _Pools, rng: np.random.Generator, shape: tuple[int, ...], spec: QuantSpec, std: float,
                  ones: bool = False) -> list:
    """The bytes of one matrix as pieces (padding included) laid out by formats.qtensor.matrix_layout,
    its dequantized values of roughly standard deviation `std` (all ones if `ones`)."""
    comps, size = matrix_layout(tuple(shape), spec)
    out, pos = [], 0
    levels = (1 << spec.bits) - 1 if spec.quantized else 0
    top = (1 << spec.meta_bits) - 1 if spec.coded_meta else 1  # the largest scale / zero code
    # q uniform on 0..levels and zero uniform on levels/2 +- 0.5: E[(q - z)^2] = (levels^2 + 2 levels + 1) / 12
    s_mean = std / np.sqrt((levels * levels + 2 * levels + 1) / 12) if spec.quantized else 0.0
    for c in comps:
        if c.offset > pos:
            out.append(_ZEROS[: c.offset - pos])
        n = int(np.prod(c.shape))
        if c.name == "weight":
            a = np.ones(n, "<f2") if ones else (pools.gauss(rng, n) * np.float32(std)).astype("<f2")
        elif c.dtype == "u8":
            a = pools.u8(rng, n)  # code planes and 4/8-bit scale / zero codes (random bytes either way)
        elif c.name == "scale_meta":
            a = _meta(c.shape[0], 0.5 * s_mean / top, 0.75 * s_mean)
        elif c.name == "zero_meta":
            a = _meta(c.shape[0], 1.0 / top, levels / 2 - 0.5)
        elif c.name == "scale":  # fp16 meta
            a = (np.float32(s_mean) * (0.75 + 0.5 * pools.u8(rng, n) / np.float32(255))).astype("<f2")
        else:  # fp16 zero
            a = (levels / 2 - 0.5 + pools.u8(rng, n) / np.float32(255)).astype("<f2")
        out.append(memoryview(np.ascontiguousarray(a)).cast("B"))
        pos = c.offset + c.nbytes
    assert pos == size
    return out


class _Record:
    """One record of the file: where it goes and how to (re)generate its bytes."""

    def __init__(self, kind: str, name: str, role: str | None, layer: int | None, expert: int | None,
                 shape: tuple | None, nbytes: int, seed: int):
        self.kind, self.name, self.role, self.layer, self.expert = kind, name, role, layer, expert
        self.shape, self.nbytes, self.seed = shape, nbytes, seed
        self.offset = 0
        self.crc = 0


def _plan(config: ModelConfig, recipe: Recipe, seed: int) -> tuple[list[_Record], int]:
    """Records in the order formats.synthetic writes them, with their offsets; and data size."""
    tensors = expected_tensors(config)
    layout = make_expert_layout(config, recipe["experts"])
    by_layer: dict[int | None, list[str]] = {}
    for name, (_, layer, _) in tensors.items():
        by_layer.setdefault(layer, []).append(name)
    order: list[_Record] = []

    def tensor(name: str) -> None:
        role, layer, shape = tensors[name]
        nbytes = matrix_layout(shape, recipe[role])[1]
        order.append(_Record("tensor", name, role, layer, None, shape, nbytes, len(order)))

    tensor("model.embed_tokens.weight")
    for L in range(config.num_hidden_layers):
        for name in by_layer[L]:
            tensor(name)
        for e in range(config.num_local_experts):
            order.append(_Record("expert", f"expert {L}.{e}", "experts", L, e, None, layout.record_size, len(order)))
    for name in by_layer[None]:
        if name != "model.embed_tokens.weight":
            tensor(name)
    pos = 0
    for r in order:
        r.offset = align_up(pos, ALIGNMENT)
        pos = r.offset + r.nbytes
    return order, pos


def _header(config: ModelConfig, recipe: Recipe, records: list[_Record], data_size: int,
            expert_counts: tuple[tuple[int, ...], ...] | None, seed: int) -> Header:
    tensors = tuple(TensorEntry(r.name, r.role, r.layer, tuple(r.shape), recipe[r.role], r.offset, r.nbytes, r.crc)
                    for r in records if r.kind == "tensor")
    experts = tuple(ExpertEntry(r.layer, r.expert, r.offset, r.crc) for r in records if r.kind == "expert")
    quantizer = QuantizerInfo("moe-pack", "synthetic", "random-packed", "-", f"runtime.offload.synthfile seed={seed}")
    return Header(config, TokenizerInfo(), quantizer, recipe, tensors, make_expert_layout(config, recipe["experts"]),
                  experts, data_size, expert_counts)


def synthetic_header(config: ModelConfig, recipe: Recipe,
                     expert_counts: tuple[tuple[int, ...], ...] | None = None) -> Header:
    """The header such a file would have (crc32 fields zero): sizes for planning, no data."""
    records, data_size = _plan(config, recipe, 0)
    return _header(config, recipe, records, data_size, expert_counts, 0)


def write_bench_file(path: str | os.PathLike, config: ModelConfig, recipe: Recipe, *, seed: int = 0,
                     expert_counts: tuple[tuple[int, ...], ...] | None = None, threads: int | None = None,
                     progress: bool = True) -> Path:
    """Write a synthetic .moepack file of `config` and `recipe` at `path` (atomically)."""
    path = Path(path)
    layout = make_expert_layout(config, recipe["experts"])
    # a few records' worth of random bytes is plenty of variety (and cheap for tiny shapes)
    pools = _Pools(seed, min(POOL_BYTES, max(1 << 20, 4 * layout.record_size)))
    records, data_size = _plan(config, recipe, seed)
    kept: dict[int, list] = {}  # non-expert records are small: generated once, kept for the write pass

    def pieces(r: _Record) -> list:
        if r.seed in kept:
            return kept[r.seed]
        rng = np.random.default_rng([seed, r.seed])
        if r.kind == "expert":
            out, pos = [], 0
            for m in layout.matrices:
                if m.offset > pos:
                    out.append(_ZEROS[: m.offset - pos])
                out += matrix_pieces(pools, rng, m.shape, m.spec, 1.0 / np.sqrt(m.shape[1]))
                pos = m.offset + m.nbytes
            if layout.record_size > pos:
                out.append(_ZEROS[: layout.record_size - pos])
            return out
        std = 1.0 if r.role == "embeddings" else 1.0 / np.sqrt(r.shape[-1])
        out = matrix_pieces(pools, rng, r.shape, recipe[r.role], std, ones=r.role == "norms")
        kept[r.seed] = out
        return out

    def crc(r: _Record) -> int:
        c = 0
        for p in pieces(r):
            c = zlib.crc32(p, c)  # releases the GIL on large buffers: the pass runs on all cores
        r.crc = c
        return r.nbytes

    bar = tqdm(total=2 * data_size, unit="B", unit_scale=True, desc=f"writing {path.name}",
               disable=not progress or data_size < (256 << 20))
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        tensors_first = sorted(records, key=lambda r: r.kind != "tensor")  # fill `kept` before the expert flood
        for n in pool.map(crc, tensors_first):
            bar.update(n)

    header = _header(config, recipe, records, data_size, expert_counts, seed)
    raw = header.to_bytes()

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb", buffering=0) as out:
            out.write(PREFIX.pack(MAGIC, header.format_version, 0, len(raw), zlib.crc32(raw), 0))
            out.write(raw)
            out.write(bytes(data_offset(len(raw)) - out.tell()))
            pos = 0
            for r in records:
                if r.offset > pos:
                    out.write(_ZEROS[: r.offset - pos])
                for p in pieces(r):
                    _write_all(out, p)
                pos = r.offset + r.nbytes
                bar.update(r.nbytes)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return path


def _write_all(f, data) -> None:
    view = memoryview(data)
    while view:
        n = f.write(view)
        view = view[n:]

