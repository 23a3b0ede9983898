"""Tiny .moepack files and the tools to take them apart and put them back together.

Error tests start from a valid synthetic file, edit the header JSON or the bytes, and
re-assemble the file with a correct prefix (header length and crc) unless the test is
about the prefix itself.
"""

from __future__ import annotations

import copy
import json
import zlib
from dataclasses import replace
from pathlib import Path

import pytest

from formats.errors import MoepackError
from formats.header import ModelConfig, QuantizerInfo, Recipe, TokenizerInfo
from formats.qtensor import QuantSpec
from formats.reader import MoepackFile
from formats.spec import ALIGNMENT, MAGIC, PREFIX, PREFIX_SIZE, align_up

FP16 = QuantSpec(16)

# The smallest config that still has every kind of tensor: GQA attention, a router, 2 experts.
TINY = ModelConfig(
    vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1, head_dim=8, num_local_experts=2, num_experts_per_tok=1, rms_norm_eps=1e-5,
    rope_theta=1e4, max_position_embeddings=32,
)
TINY_TIED = replace(TINY, tie_word_embeddings=True)

# Every stored form appears once: 8-bit meta (attention, experts), fp16 meta and a 3-bit
# high plane (lm_head), plain fp16 (embeddings, norms, router).
RECIPE = Recipe({
    "embeddings": FP16, "attention": QuantSpec(4, 16, 8, 4), "norms": FP16, "router": FP16,
    "experts": QuantSpec(2, 16, 8, 4), "lm_head": QuantSpec(3, 16, 16, 0),
})

# Format version 2's one addition: 4-bit meta codes (here on attention and experts).
RECIPE_V2 = Recipe({**RECIPE.specs, "attention": QuantSpec(4, 16, 4, 4), "experts": QuantSpec(2, 16, 4, 3)})

QUANTIZER = QuantizerInfo("moe-pack", "test", "none", "-", "tests")
TOKENIZER = TokenizerInfo(
    tokenizer_json='{"model": "x", "note": "ünïcödé \\u2603"}', chat_template="{{ messages }}\n",
    bos_token_id=1, eos_token_ids=(2, 5), add_bos_token=False,
)


def canonical(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def split(raw: bytes) -> tuple[dict, bytes]:
    """A valid file's bytes -> (header as a JSON dict, data section bytes)."""
    header_len = PREFIX.unpack_from(raw)[3]
    header = json.loads(raw[PREFIX_SIZE : PREFIX_SIZE + header_len])
    start = align_up(PREFIX_SIZE + header_len, ALIGNMENT)
    return header, raw[start:]


def assemble(
    header: dict | bytes,
    data: bytes,
    *,
    magic: bytes = MAGIC,
    version: int | None = None,
    flags: int = 0,
    header_len: int | None = None,
    crc: int | None = None,
    reserved: int = 0,
    padding: bytes | None = None,
    tail: bytes = b"",
) -> bytes:
    """prefix + header + padding to the next 4096 boundary + data + tail; the prefix is
    correct for the header given unless a field is overridden."""
    raw = canonical(header) if isinstance(header, dict) else header
    if version is None:  # the version the writer would put there
        version = 2 if b'"meta_bits":4' in raw else 1  # canonical JSON: no spaces
    pad_len = align_up(PREFIX_SIZE + len(raw), ALIGNMENT) - PREFIX_SIZE - len(raw)
    if padding is None:
        padding = bytes(pad_len)
    assert len(padding) == pad_len, "padding must fill exactly up to the data section"
    prefix = PREFIX.pack(
        magic, version, flags, len(raw) if header_len is None else header_len,
        zlib.crc32(raw) if crc is None else crc, reserved,
    )
    return prefix + raw + padding + data + tail


def fix_header_crc(raw: bytearray) -> bytearray:
    """Recompute the prefix crc over whatever header the (maybe damaged) prefix points at."""
    header_len = PREFIX.unpack_from(raw)[3]
    if PREFIX_SIZE + header_len <= len(raw):
        raw[24:28] = zlib.crc32(bytes(raw[PREFIX_SIZE : PREFIX_SIZE + header_len])).to_bytes(4, "little")
    return raw


class TinyFile:
    """A valid tiny file kept in memory; `edited` gives fresh copies to break."""

    def __init__(self, path: Path):
        self.path = path
        self.raw = path.read_bytes()
        self.header, self.data = split(self.raw)

    def edited(self) -> tuple[dict, bytearray]:
        return copy.deepcopy(self.header), bytearray(self.data)

    def tensor(self, header: dict, name: str) -> dict:
        return next(t for t in header["tensors"] if t["name"] == name)


def open_error(path: Path, cls: type[MoepackError], *needles: str) -> MoepackError:
    """Open `path`, expect exactly `cls`, and check the message is one line naming the file
    and containing every needle."""
    with pytest.raises(MoepackError) as info:
        MoepackFile(path)
    e = info.value
    assert type(e) is cls, f"expected {cls.__name__}, got {type(e).__name__}: {e.message}"
    check_message(e, *needles)
    assert e.message.startswith(f"{path}: "), e.message
    return e


def check_message(e: MoepackError, *needles: str) -> None:
    assert e.message and "\n" not in e.message, repr(e.message)
    assert e.hint and "\n" not in e.hint, repr(e.hint)
    for needle in needles:
        assert needle in e.message, f"{needle!r} not in {e.message!r}"
