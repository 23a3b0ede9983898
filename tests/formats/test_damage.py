"""Damaged files: a truncated or corrupted file must raise a MoepackError subclass, never
another exception, and a file that does open must be safe to read in full."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formats.errors import ChecksumError, MoepackError, TruncatedFileError
from formats.reader import MoepackFile
from tests.formats.helpers import assemble, fix_header_crc, split

# MOEPACK_FUZZ_EXAMPLES=20000 for a long hunt; the default keeps the suite fast
FUZZ = settings(
    max_examples=int(os.environ.get("MOEPACK_FUZZ_EXAMPLES", "150")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def read_everything(f: MoepackFile) -> None:
    """What a runtime does with an open file: any crash here means validation let a bad header through."""
    for t in f.header.tensors:
        w = f.tensor_array(t.name)
        assert w.shape == t.shape
    for e in f.header.experts:
        for m, w in f.expert_arrays(e.layer, e.expert).items():
            assert w.shape == f.header.expert_layout.matrix(m).shape
    try:
        f.verify()
    except ChecksumError:
        pass  # a changed offset points the crc at other bytes: that is what verify is for


def open_or_moepack_error(path) -> MoepackFile | None:
    try:
        return MoepackFile(path)
    except MoepackError as e:
        assert e.message and "\n" not in e.message, repr(e.message)
        return None


def test_truncation_at_every_offset(smallest, tmp_path):
    """Every strict prefix of a valid file, down to the empty file, reads as truncated."""
    path = tmp_path / "cut.moepack"
    shutil.copyfile(smallest, path)
    size = path.stat().st_size
    MoepackFile(path)  # the whole file is fine
    wrong = {}
    for n in range(size - 1, -1, -1):  # shrinking one file in place is far cheaper than n copies
        os.truncate(path, n)
        try:
            MoepackFile(path)
            wrong[n] = "opened"
        except TruncatedFileError:
            pass
        except MoepackError as e:  # a MoepackError, but not the documented one
            wrong[n] = f"{type(e).__name__}: {e.message}"
        if len(wrong) > 5:
            break
    assert not wrong, wrong


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(data=st.data(), fix_crc=st.booleans())
def test_corrupt_prefix_and_header_bytes(tiny, fuzz_dir, data, fix_crc):
    """Replace a few bytes of the prefix, header or padding. With fix_crc the header crc is
    recomputed, so the damage reaches the JSON parser and the schema checks."""
    raw = bytearray(tiny.raw)
    region = len(raw) - len(tiny.data)  # prefix + header + padding
    edits = data.draw(st.lists(st.tuples(st.integers(0, region - 1), st.integers(0, 255)), min_size=1, max_size=8))
    for pos, value in edits:
        raw[pos] = value
    if fix_crc:
        fix_header_crc(raw)
    path = fuzz_dir / "corrupt.moepack"
    path.write_bytes(raw)
    f = open_or_moepack_error(path)
    if f is not None:
        read_everything(f)


# --- structural damage: valid JSON, wrong content -----------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def paths(node, prefix=()):
    """Every (container path, key) in a JSON tree."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield prefix, k
        yield from paths(v, prefix + (k,))


def nudge(value, draw):
    """A plausible wrong value: numbers move a little (to reach the arithmetic checks),
    anything else becomes an arbitrary JSON value."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value + draw(st.sampled_from([-4096, -64, -1, 1, 64, 4096, 2**31, -value, 2**63 - 1 - value]))
    if isinstance(value, float) and math.isfinite(value):
        return draw(st.sampled_from([-value, 0.0, value * 2, 1e308]))
    return draw(JSON_VALUES)


@pytest.fixture(scope="module")
def header_paths(tiny):
    return list(paths(tiny.header))


@FUZZ
@given(data=st.data())
def test_mutated_header_values(tiny, header_paths, fuzz_dir, data):
    header = copy.deepcopy(tiny.header)
    for _ in range(data.draw(st.integers(1, 3))):
        prefix, key = data.draw(st.sampled_from(header_paths))
        try:
            parent = header
            for k in prefix:
                parent = parent[k]
            value = parent[key]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this part of the tree
        op = data.draw(st.sampled_from(["nudge", "replace", "delete", "add"]))
        if op == "nudge":
            parent[key] = nudge(value, data.draw)
        elif op == "replace":
            parent[key] = data.draw(JSON_VALUES)
        elif op == "delete":
            parent.pop(key) if isinstance(parent, dict) else parent.pop(key)
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=6))] = data.draw(JSON_VALUES)
        else:
            parent.insert(key, copy.deepcopy(value))
    _, data_bytes = split(tiny.raw)
    path = fuzz_dir / "mutated.moepack"
    path.write_bytes(assemble(json.dumps(header, ensure_ascii=False).encode(), data_bytes))
    f = open_or_moepack_error(path)
    if f is not None:
        read_everything(f)
