"""The reader: views and arrays are exactly the written bytes and their reference decode."""

from __future__ import annotations

import json

import numpy as np
import pytest

from formats.errors import ChecksumError, HeaderError, LayoutError
from formats.layout import expected_tensors
from formats.qtensor import component_views, decode_matrix
from formats.reader import MoepackFile, open_moepack
from formats.synthetic import random_matrix_bytes
from formats.writer import MoepackWriter, pack_expert
from tests.formats.helpers import QUANTIZER, RECIPE, TINY, TOKENIZER, assemble, check_message


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A file plus every payload that went into it."""
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("reader") / "r.moepack"
    tensors, experts = {}, {}
    with MoepackWriter(path, config=TINY, tokenizer=TOKENIZER, quantizer=QUANTIZER, recipe=RECIPE) as w:
        for name, (role, layer, shape) in expected_tensors(TINY).items():
            tensors[name] = random_matrix_bytes(rng, shape, RECIPE[role], 0.5)
            w.add_tensor(name, role, layer, shape, tensors[name])
        for e in range(TINY.num_local_experts):
            experts[(0, e)] = {m.name: random_matrix_bytes(rng, m.shape, m.spec, 0.5) for m in w.expert_layout.matrices}
            w.add_expert(0, e, experts[(0, e)])
        w.finish()
    return path, tensors, experts


def test_tensors_read_back(written):
    path, tensors, _ = written
    f = open_moepack(path)
    for t in f.header.tensors:
        payload = tensors[t.name]
        assert f.tensor_bytes(t.name).tobytes() == payload
        want = component_views(payload, t.shape, t.spec)
        got = f.tensor_views(t.name)
        assert list(got) == list(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
        arr = f.tensor_array(t.name)
        assert arr.dtype == np.float32 and arr.shape == t.shape
        np.testing.assert_array_equal(arr, decode_matrix(want, t.shape, t.spec))
    # the decode is not trivially zero: embeddings are random with std 0.5
    assert f.tensor_array("model.embed_tokens.weight").std() > 0.1


def test_experts_read_back(written):
    path, _, experts = written
    f = MoepackFile(path)
    lay = f.header.expert_layout
    for (layer, e), mats in experts.items():
        assert f.expert_bytes(layer, e).tobytes() == pack_expert(lay, mats)
        views, arrays = f.expert_views(layer, e), f.expert_arrays(layer, e)
        assert list(views) == list(arrays) == ["w1", "w3", "w2"]
        for m in lay.matrices:
            want = component_views(mats[m.name], m.shape, m.spec)
            for k in want:
                np.testing.assert_array_equal(views[m.name][k], want[k])
            np.testing.assert_array_equal(arrays[m.name], decode_matrix(want, m.shape, m.spec))


def test_views_are_read_only(written):
    f = MoepackFile(written[0])
    with pytest.raises(ValueError):
        f.tensor_views("model.norm.weight")["weight"][0] = 0
    with pytest.raises(ValueError):
        f.expert_views(0, 0)["w1"]["q"][0, 0] = 0


def test_verify_counts_every_byte(written):
    f = MoepackFile(written[0])
    seen = []
    total = f.verify(progress=seen.append)
    rs = f.header.expert_layout.record_size
    assert seen == [n for _, _, n, _ in f.records()]
    assert total == sum(t.nbytes for t in f.header.tensors) + rs * len(f.header.experts)


def test_verify_names_a_flipped_byte(written, tmp_path):
    raw = bytearray(written[0].read_bytes())
    f = MoepackFile(written[0])
    e = f.header.expert(0, 1)
    raw[f.data_offset + e.offset + 5] ^= 0x10
    bad = tmp_path / "flipped.moepack"
    bad.write_bytes(raw)
    with pytest.raises(ChecksumError) as info:
        MoepackFile(bad).verify()
    check_message(info.value, str(bad), "expert 0.1", "crc32")


def test_verify_rejects_nonzero_padding_between_records(written, tmp_path):
    raw = bytearray(written[0].read_bytes())
    f = MoepackFile(written[0])
    t = f.header.tensor("model.layers.0.input_layernorm.weight")  # a small tensor: padding follows it
    raw[f.data_offset + t.offset + t.nbytes] = 1
    bad = tmp_path / "padding.moepack"
    bad.write_bytes(raw)
    with pytest.raises(LayoutError) as info:
        MoepackFile(bad).verify()
    check_message(info.value, str(bad), "padding")


def test_unknown_tensor_name(written):
    with pytest.raises(HeaderError, match="no tensor 'nope'"):
        MoepackFile(written[0]).tensor_array("nope")


def test_context_manager_closes(written):
    with MoepackFile(written[0]) as f:
        assert f.config == TINY
    assert f.data is None


def test_any_valid_json_spelling_is_accepted(tiny, tmp_path):
    """Writers must write canonical JSON; readers must not insist on it (FORMAT.md "Encoding")."""
    loose = json.dumps(dict(reversed(list(tiny.header.items()))), indent=2, ensure_ascii=True).encode()
    path = tmp_path / "loose.moepack"
    path.write_bytes(assemble(loose, tiny.data))
    assert MoepackFile(path).header == MoepackFile(tiny.path).header
