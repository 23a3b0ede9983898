"""The writer: deterministic bytes, atomic output, and the alignment rules of docs/FORMAT.md."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from formats.errors import HeaderError, LayoutError, MoepackError
from formats.header import Header
from formats.layout import expected_tensors
from formats.qtensor import matrix_layout
from formats.reader import MoepackFile
from formats.spec import ALIGNMENT, COMPONENT_ALIGNMENT, MAGIC, PREFIX, PREFIX_SIZE
from formats.synthetic import random_matrix_bytes, write_synthetic
from formats.writer import MoepackWriter, make_expert_layout
from tests.formats.helpers import QUANTIZER, RECIPE, TINY, TOKENIZER



def writer(path):
    return MoepackWriter(path, config=TINY, tokenizer=TOKENIZER, quantizer=QUANTIZER, recipe=RECIPE)


def fill(w: MoepackWriter, seed: int = 0, skip: str | None = None) -> None:
    rng = np.random.default_rng(seed)
    for name, (role, layer, shape) in expected_tensors(TINY).items():
        if name != skip:
            w.add_tensor(name, role, layer, shape, random_matrix_bytes(rng, shape, RECIPE[role], 0.1), rel_error=0.01)
    for layer in range(TINY.num_hidden_layers):
        for e in range(TINY.num_local_experts):
            mats = {m.name: random_matrix_bytes(rng, m.shape, m.spec, 0.1) for m in w.expert_layout.matrices}
            w.add_expert(layer, e, mats, rel_error=(0.1, 0.2, 0.3))


def test_same_input_same_bytes(tmp_path):
    a = write_synthetic(tmp_path / "a.moepack", TINY, RECIPE, seed=7)
    b = write_synthetic(tmp_path / "b.moepack", TINY, RECIPE, seed=7)
    c = write_synthetic(tmp_path / "c.moepack", TINY, RECIPE, seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()  # the comparison above is not vacuous


def test_writer_output_is_deterministic_with_everything_set(tmp_path):
    raws = []
    for name in ("x.moepack", "y.moepack"):
        with writer(tmp_path / name) as w:
            fill(w)
            w.finish(expert_counts=((3, 4),))
        raws.append((tmp_path / name).read_bytes())
    assert raws[0] == raws[1]
    f = MoepackFile(tmp_path / "x.moepack")
    assert f.header.tokenizer == TOKENIZER and f.header.expert_counts == ((3, 4),)
    assert f.header.expert(0, 1).rel_error == (0.1, 0.2, 0.3)


def test_exception_inside_with_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with writer(tmp_path / "out.moepack") as w:
            fill(w)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_failed_finish_leaves_nothing(tmp_path):
    with pytest.raises(HeaderError, match="lacks tensor 'model.norm.weight'"):
        with writer(tmp_path / "out.moepack") as w:
            fill(w, skip="model.norm.weight")
            w.finish()
    assert list(tmp_path.iterdir()) == []


def test_finish_replaces_an_existing_file_atomically(tmp_path):
    target = tmp_path / "out.moepack"
    target.write_bytes(b"old")
    with writer(target) as w:
        fill(w)
        w.finish()
    assert target.read_bytes()[:8] == MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["out.moepack"]


def test_wrong_payload_sizes_are_refused(tmp_path):
    with writer(tmp_path / "out.moepack") as w:
        with pytest.raises(LayoutError, match="model.norm.weight: 30 bytes given"):
            w.add_tensor("model.norm.weight", "norms", None, (16,), bytes(30))
        with pytest.raises(LayoutError, match="expert matrix w1: 3 bytes given"):
            w.add_expert(0, 0, {"w1": bytes(3), "w3": b"", "w2": b""})
        w.abort()
    assert list(tmp_path.iterdir()) == []


def test_missing_output_folder(tmp_path):
    with pytest.raises(MoepackError, match="does not exist"):
        writer(tmp_path / "no" / "out.moepack")


def test_header_round_trip(tiny):
    h = MoepackFile(tiny.path).header
    raw = h.to_bytes()
    again = Header.from_bytes(raw)
    assert again == h
    assert again.to_bytes() == raw


def test_header_round_trip_with_every_optional_field(tmp_path):
    with writer(tmp_path / "x.moepack") as w:
        fill(w)
        path = w.finish(expert_counts=((1, 0),))
    h = MoepackFile(path).header
    assert Header.from_bytes(h.to_bytes()) == h
    assert h.tensor("model.norm.weight").rel_error == 0.01


def test_alignment_of_every_record_and_component(tiny):
    f = MoepackFile(tiny.path)
    h = f.header
    assert f.data_offset % ALIGNMENT == 0 and f.data_offset >= PREFIX_SIZE + PREFIX.unpack_from(tiny.raw)[3]
    for t in h.tensors:
        assert t.offset % ALIGNMENT == 0
        assert all(c.offset % COMPONENT_ALIGNMENT == 0 for c in t.components)
    assert h.expert_layout.record_size % ALIGNMENT == 0
    for m in h.expert_layout.matrices:
        assert m.offset % COMPONENT_ALIGNMENT == 0
        assert all(c.offset % COMPONENT_ALIGNMENT == 0 for c in m.components)
    assert all(e.offset % ALIGNMENT == 0 for e in h.experts)
    assert h.expert_layout == make_expert_layout(TINY, RECIPE["experts"])


def test_file_order_padding_and_crcs(tiny):
    """Records in writer order with zero gaps; crc32 over exactly nbytes / record_size."""
    f = MoepackFile(tiny.path)
    h = f.header
    magic, version, flags, header_len, crc, reserved = PREFIX.unpack_from(tiny.raw)
    assert (magic, version, flags, reserved) == (MAGIC, 1, 0, 0)  # nothing here needs version 2
    assert crc == zlib.crc32(tiny.raw[PREFIX_SIZE : PREFIX_SIZE + header_len])
    data = np.frombuffer(tiny.data, np.uint8)
    covered = np.zeros(len(data), bool)
    labels = [label for label, *_ in f.records()]
    assert labels[0] == "tensor model.embed_tokens.weight" and labels[-1] == "tensor lm_head.weight"
    assert labels.index("expert 0.0") > labels.index("tensor model.layers.0.block_sparse_moe.gate.weight")
    for label, offset, nbytes, crc in f.records():
        assert zlib.crc32(data[offset : offset + nbytes]) == crc, label
        covered[offset : offset + nbytes] = True
    assert not data[~covered].any()  # padding between records is zero
    assert covered[-1]  # the last record ends exactly at the end of the file
    assert h.data_size == len(data)


def test_expert_record_holds_the_three_matrices_back_to_back():
    lay = make_expert_layout(TINY, RECIPE["experts"])
    w1, w3, w2 = lay.matrices
    assert [m.name for m in lay.matrices] == ["w1", "w3", "w2"]
    assert (w1.shape, w3.shape, w2.shape) == ((32, 16), (32, 16), (16, 32))
    assert w1.offset == 0
    assert w3.offset == -(-w1.nbytes // 64) * 64 and w2.offset == w3.offset + -(-w3.nbytes // 64) * 64
    assert lay.record_size == -(-(w2.offset + w2.nbytes) // ALIGNMENT) * ALIGNMENT
    assert w1.nbytes == matrix_layout((32, 16), RECIPE["experts"])[1]
