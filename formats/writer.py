"""Deterministic, atomic writer of .moepack files.

Records are streamed to a temporary data file as they are produced (so quantizing a model
never holds more than one record in memory); `finish` then writes prefix + header into a
second temporary file next to the target, appends the data, fsyncs and renames it into
place. An interrupted run leaves only dot-files ending in `.tmp`, never a file that looks
valid, and the same records in the same order give the same bytes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zlib
from pathlib import Path

from .errors import LayoutError, MoepackError
from .header import (
    ExpertEntry, ExpertLayout, Header, MatrixLayout, ModelConfig, QuantizerInfo, Recipe, TensorEntry, TokenizerInfo,
)
from .layout import expert_shapes
from .qtensor import QuantSpec, matrix_layout
from .reader import read_header
from .spec import ALIGNMENT, COMPONENT_ALIGNMENT, EXPERT_MATRICES, MAGIC, PREFIX, align_up, data_offset


def make_expert_layout(config: ModelConfig, spec: QuantSpec) -> ExpertLayout:
    """w1, w3, w2 back to back (64-byte aligned), the record rounded up to 4096 bytes."""
    shapes, mats, offset = expert_shapes(config), [], 0
    for name in EXPERT_MATRICES:
        mats.append(MatrixLayout(name, shapes[name], spec, offset))
        offset = align_up(offset + mats[-1].nbytes, COMPONENT_ALIGNMENT)
    return ExpertLayout(align_up(mats[-1].offset + mats[-1].nbytes, ALIGNMENT), tuple(mats))


def pack_expert(layout: ExpertLayout, matrices: dict[str, bytes]) -> bytes:
    """One expert record: each matrix's encoded bytes at its offset, zero padding elsewhere."""
    out = bytearray(layout.record_size)
    for m in layout.matrices:
        data = matrices[m.name]
        if len(data) != m.nbytes:
            raise LayoutError(f"expert matrix {m.name}: {len(data)} bytes given, the layout needs {m.nbytes}")
        out[m.offset : m.offset + m.nbytes] = data
    return bytes(out)


class MoepackWriter:
    def __init__(
        self,
        path: str | os.PathLike,
        *,
        config: ModelConfig,
        tokenizer: TokenizerInfo,
        quantizer: QuantizerInfo,
        recipe: Recipe,
    ):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise MoepackError(f"output folder {self.path.parent} does not exist", hint="create it first")
        self.config, self.tokenizer, self.quantizer, self.recipe = config, tokenizer, quantizer, recipe
        self.expert_layout = make_expert_layout(config, recipe["experts"])
        self._tensors: list[TensorEntry] = []
        self._experts: list[ExpertEntry] = []
        fd, name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".data.tmp")
        self._data_path = Path(name)
        self._data = os.fdopen(fd, "wb")
        self._pos = 0

    def _append(self, payload: bytes) -> tuple[int, int]:
        pad = align_up(self._pos, ALIGNMENT) - self._pos
        if pad:
            self._data.write(bytes(pad))
        offset = self._pos + pad
        self._data.write(payload)
        self._pos = offset + len(payload)
        return offset, zlib.crc32(payload)

    def add_tensor(self, name: str, role: str, layer: int | None, shape: tuple[int, ...], payload: bytes,
                   rel_error: float | None = None) -> None:
        spec = self.recipe[role]
        size = matrix_layout(tuple(shape), spec)[1]
        if len(payload) != size:
            raise LayoutError(f"tensor {name}: {len(payload)} bytes given, a {spec.describe()} tensor of shape {list(shape)} needs {size}")
        offset, crc = self._append(payload)
        self._tensors.append(TensorEntry(name, role, layer, tuple(shape), spec, offset, len(payload), crc, rel_error))

    def add_expert(self, layer: int, expert: int, matrices: dict[str, bytes],
                   rel_error: tuple[float, float, float] | None = None) -> None:
        offset, crc = self._append(pack_expert(self.expert_layout, matrices))
        self._experts.append(ExpertEntry(layer, expert, offset, crc, rel_error))

    def finish(self, expert_counts: tuple[tuple[int, ...], ...] | None = None) -> Path:
        """Validate the whole header, then write the file atomically. Returns its path."""
        try:
            self._data.close()
            header = Header(
                self.config, self.tokenizer, self.quantizer, self.recipe, tuple(self._tensors),
                self.expert_layout, tuple(self._experts), self._pos, expert_counts,
            )
            raw = header.to_bytes()
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(PREFIX.pack(MAGIC, header.format_version, 0, len(raw), zlib.crc32(raw), 0))
                    out.write(raw)
                    out.write(bytes(data_offset(len(raw)) - out.tell()))
                    with open(self._data_path, "rb") as src:
                        shutil.copyfileobj(src, out, 16 << 20)
                    out.flush()
                    os.fsync(out.fileno())
                # mkstemp makes the file 0600; give it the mode a plain open() would have
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        finally:
            self._data_path.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        self._data.close()
        self._data_path.unlink(missing_ok=True)

    def __enter__(self) -> "MoepackWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def _atomic_copy_with_header(path: Path, raw: bytes, version: int, old_data_offset: int, data_size: int) -> None:
    """Write prefix + `raw` + padding + the data section of `path` (read from old_data_offset)
    to a temporary file beside it, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
            out.write(PREFIX.pack(MAGIC, version, 0, len(raw), zlib.crc32(raw), 0))
            out.write(raw)
            out.write(bytes(data_offset(len(raw)) - out.tell()))
            src.seek(old_data_offset)
            left = data_size
            while left:
                chunk = src.read(min(left, 16 << 20))
                if not chunk:
                    raise LayoutError(f"{path}: the data section ended {left} bytes early while copying")
                out.write(chunk)
                left -= len(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, os.stat(path).st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rewrite_header(path: str | os.PathLike, header: Header) -> Path:
    """Replace the header of the file at `path` by `header`, which may differ from the current
    one only in metadata (today: expert_counts); every record keeps its offset and bytes.

    The file is rewritten atomically (temporary file + rename): a header that grows past its
    padding moves the data section, and an in-place write interrupted half way would leave a
    file whose header no longer matches its checksum."""
    path = Path(path)
    old, old_offset, _ = read_header(path)
    same_records = (old.tensors == header.tensors and old.experts == header.experts
                    and old.expert_layout == header.expert_layout and old.data_size == header.data_size)
    if not same_records:
        raise LayoutError(f"{path}: the new header moves or changes records; only metadata may change in place",
                          hint="write a new file with MoepackWriter instead")
    _atomic_copy_with_header(path, header.to_bytes(), header.format_version, old_offset, header.data_size)
    return path
