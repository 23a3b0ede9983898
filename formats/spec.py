"""Constants of the .moepack container (docs/FORMAT.md, section "Container")."""

from __future__ import annotations

import struct

MAGIC = b"MOEPACK\x00"
VERSION = 2  # the newest version this package reads and writes
VERSIONS = (1, 2)  # every version it reads
# magic (8s), version (u32), flags (u32), header_len (u64), header_crc32 (u32), reserved (u32)
PREFIX = struct.Struct("<8sIIQII")
PREFIX_SIZE = PREFIX.size  # 32
ALIGNMENT = 4096  # every record (tensor or expert) starts on this boundary
COMPONENT_ALIGNMENT = 64  # every component inside a record starts on this boundary
HEADER_MAX_BYTES = 64 * 1024 * 1024
MAX_OFFSET = 2**63 - 1  # sizes and offsets must fit a signed 64-bit integer

ROLES = ("embeddings", "attention", "norms", "router", "experts", "lm_head")
EXPERT_MATRICES = ("w1", "w3", "w2")


def align_up(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def data_offset(header_len: int) -> int:
    return align_up(PREFIX_SIZE + header_len, ALIGNMENT)


def required_version(specs) -> int:
    """The lowest format version that can store quantization specs `specs`: writers write it, so
    a file that uses nothing newer stays readable by older readers (FORMAT.md "Versioning")."""
    return 2 if any(s.meta_bits == 4 for s in specs) else 1
