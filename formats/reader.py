"""Reader of .moepack files: validates the prefix and the whole header before touching
data, then exposes records as zero-copy views of a read-only memory map."""

from __future__ import annotations

import os
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import (
    BadMagicError, ChecksumError, FormatError, HeaderError, LayoutError, MoepackError, TruncatedFileError,
    UnsupportedVersionError,
)
from .header import Header, TensorEntry
from .qtensor import component_views, decode_matrix
from .spec import HEADER_MAX_BYTES, MAGIC, PREFIX, PREFIX_SIZE, VERSIONS, data_offset


def read_header(path: Path) -> tuple[Header, int, int]:
    """(header, data_offset, file_size) after every check that needs no record bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(PREFIX_SIZE)
        if len(prefix) < len(MAGIC) or prefix[: len(MAGIC)] != MAGIC:
            # a strict prefix of a valid file (even an empty one) always reads as truncated
            if len(prefix) < len(MAGIC) and MAGIC.startswith(prefix):
                raise TruncatedFileError(f"file is {size} bytes, shorter than the {PREFIX_SIZE}-byte prefix")
            raise BadMagicError("not a .moepack file (bad magic bytes)")
        if len(prefix) < PREFIX_SIZE:
            raise TruncatedFileError(f"file is {size} bytes, shorter than the {PREFIX_SIZE}-byte prefix")
        _, version, flags, header_len, header_crc, reserved = PREFIX.unpack(prefix)
        if version not in VERSIONS:
            known = " and ".join(str(v) for v in VERSIONS)
            raise UnsupportedVersionError(f"format version {version} is not supported (this reader knows {known})")
        if flags or reserved:
            raise HeaderError(f"prefix flags={flags} reserved={reserved} must be 0 in version {version}")
        if header_len > HEADER_MAX_BYTES:
            raise HeaderError(f"header length {header_len} exceeds the {HEADER_MAX_BYTES}-byte cap")
        if PREFIX_SIZE + header_len > size:
            raise TruncatedFileError(f"file is {size} bytes but its header ends at byte {PREFIX_SIZE + header_len}")
        raw = f.read(header_len)
        if zlib.crc32(raw) != header_crc:
            raise ChecksumError("header crc32 does not match its bytes")
        header = _parse_header(raw)
        if header.format_version > version:
            raise HeaderError(f"the recipe uses 4-bit meta, which format version {version} does not define "
                              f"(it needs version {header.format_version})")
        start = data_offset(header_len)
        if size < start + header.data_size:
            raise TruncatedFileError(f"file is {size} bytes but its data section ends at byte {start + header.data_size}")
        if size > start + header.data_size:
            raise LayoutError(f"file has {size - start - header.data_size} bytes after the end of its data section")
        if any(f.read(start - PREFIX_SIZE - header_len)):
            raise LayoutError("the padding between header and data section is not zero")
    return header, start, size


# Header is immutable, so equal bytes may share one parse: re-opening a file in the same
# process (a tool and the runtime on one file, a test opening it at every truncation
# length) then skips the JSON schema walk, the costly part of opening.
def _parse_header(raw: bytes) -> Header:
    # a cache entry keeps the raw bytes alive too: skip it for implausibly large headers
    return _parse_header_cached(raw) if len(raw) <= 8 << 20 else Header.from_bytes(raw)


@lru_cache(maxsize=4)
def _parse_header_cached(raw: bytes) -> Header:
    return Header.from_bytes(raw)


class MoepackFile:
    """An open, validated .moepack file. All data access is through the memory map."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise MoepackError(f"{self.path}: no such file", hint="check the path")
        if not self.path.is_file():
            raise MoepackError(f"{self.path}: not a regular file", hint="pass the .moepack file itself")
        try:
            self.header, self.data_offset, self.size = read_header(self.path)
        except FormatError as e:
            raise type(e)(f"{self.path}: {e.message}", hint=e.hint) from None
        # mode "r": read-only, so a bug can never write into a user's model file
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.data = self._map[self.data_offset :]

    @property
    def config(self):
        return self.header.config

    def record(self, offset: int, nbytes: int) -> np.ndarray:
        return self.data[offset : offset + nbytes]

    def tensor_bytes(self, name: str) -> np.ndarray:
        t = self.header.tensor(name)
        return self.record(t.offset, t.nbytes)

    def tensor_views(self, name: str) -> dict[str, np.ndarray]:
        t = self.header.tensor(name)
        return component_views(self.data, t.shape, t.spec, base=t.offset)

    def tensor_array(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32 with the reference decoder."""
        t = self.header.tensor(name)
        return decode_matrix(self.tensor_views(name), t.shape, t.spec)

    def expert_bytes(self, layer: int, expert: int) -> np.ndarray:
        e = self.header.expert(layer, expert)
        return self.record(e.offset, self.header.expert_layout.record_size)

    def expert_views(self, layer: int, expert: int) -> dict[str, dict[str, np.ndarray]]:
        e = self.header.expert(layer, expert)
        return {m.name: component_views(self.data, m.shape, m.spec, base=e.offset + m.offset) for m in self.header.expert_layout.matrices}

    def expert_arrays(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        views = self.expert_views(layer, expert)
        return {m.name: decode_matrix(views[m.name], m.shape, m.spec) for m in self.header.expert_layout.matrices}

    def records(self) -> Iterator[tuple[str, int, int, int]]:
        """(label, offset, nbytes, crc32) of every record in file order."""
        rs = self.header.expert_layout.record_size
        items = [(f"tensor {t.name}", t.offset, t.nbytes, t.crc32) for t in self.header.tensors]
        items += [(f"expert {e.layer}.{e.expert}", e.offset, rs, e.crc32) for e in self.header.experts]
        return iter(sorted(items, key=lambda r: r[1]))

    def verify_record(self, label: str, offset: int, nbytes: int, crc: int) -> None:
        if zlib.crc32(self.record(offset, nbytes)) != crc:
            raise ChecksumError(f"{self.path}: {label} fails its crc32 check")

    def verify_tensor(self, t: TensorEntry) -> None:
        self.verify_record(f"tensor {t.name}", t.offset, t.nbytes, t.crc32)

    def verify(self, progress: Callable[[int], None] | None = None) -> int:
        """Check every record's crc32 and that the alignment padding between records is zero;
        `progress(nbytes)` after each record. Returns the record bytes checked."""
        total = end = 0
        for label, offset, nbytes, crc in self.records():
            if self.record(end, offset - end).any():
                raise LayoutError(f"{self.path}: the padding before {label} is not zero")
            self.verify_record(label, offset, nbytes, crc)
            end = offset + nbytes
            total += nbytes
            if progress:
                progress(nbytes)
        return total

    def close(self) -> None:
        # views handed out keep the map alive; dropping our references is all we can do
        self.data = self._map = None

    def __enter__(self) -> "MoepackFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_moepack(path: str | os.PathLike) -> MoepackFile:
    return MoepackFile(path)
