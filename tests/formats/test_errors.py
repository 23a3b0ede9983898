"""One test per rule of docs/FORMAT.md "Validation": a valid tiny file, broken in exactly one
way, must raise exactly the documented MoepackError subclass with a one-line message that
names the problem."""

from __future__ import annotations

import pytest

from formats.errors import (
    BadMagicError, ChecksumError, HeaderError, LayoutError, MoepackError, TruncatedFileError, UnsupportedVersionError,
)
from formats.header import components_to_json
from formats.qtensor import QuantSpec, matrix_layout
from formats.reader import MoepackFile
from formats.spec import ALIGNMENT, HEADER_MAX_BYTES
from formats.spec import PREFIX
from formats.synthetic import write_synthetic
from tests.formats.helpers import RECIPE_V2, TINY, assemble, canonical, check_message, open_error, split

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"


def put(tmp_path, raw: bytes, name: str = "bad.moepack"):
    path = tmp_path / name
    path.write_bytes(raw)
    return path


def broken(tmp_path, tiny, edit, **prefix):
    """Apply `edit(header, data)` to copies of the tiny file and write the result."""
    header, data = tiny.edited()
    edit(header, data)
    return put(tmp_path, assemble(header, bytes(data), **prefix))


def test_the_untouched_reassembly_opens(tmp_path, tiny):
    # the helpers themselves must produce a valid file, or every test below proves nothing
    path = broken(tmp_path, tiny, lambda h, d: None)
    assert path.read_bytes() == tiny.raw
    MoepackFile(path).verify()


# --- prefix -------------------------------------------------------------------------------

def test_bad_magic(tmp_path, tiny):
    open_error(put(tmp_path, b"GGUF" + tiny.raw[4:]), BadMagicError, "magic")


def test_not_a_moepack_file_at_all(tmp_path):
    open_error(put(tmp_path, b"{\"hello\": 1}\n"), BadMagicError, "magic")


@pytest.mark.parametrize("version", [0, 3])
def test_unsupported_version(tmp_path, tiny, version):
    open_error(broken(tmp_path, tiny, lambda h, d: None, version=version), UnsupportedVersionError, f"version {version}")


def test_version_2_reads_a_file_without_version_2_features(tmp_path, tiny):
    assert MoepackFile(broken(tmp_path, tiny, lambda h, d: None, version=2)).header == MoepackFile(tiny.path).header


def test_4bit_meta_needs_version_2(tmp_path):
    path = write_synthetic(tmp_path / "v2.moepack", TINY, RECIPE_V2, seed=3)
    assert PREFIX.unpack_from(path.read_bytes())[1] == 2
    assert MoepackFile(path).header.recipe["experts"].meta_bits == 4
    header, data = split(path.read_bytes())
    open_error(put(tmp_path, assemble(header, data, version=1)), HeaderError, "4-bit meta", "version 1")


@pytest.mark.parametrize("field", ["flags", "reserved"])
def test_nonzero_flags_or_reserved(tmp_path, tiny, field):
    open_error(broken(tmp_path, tiny, lambda h, d: None, **{field: 1}), HeaderError, f"{field}=1")


def test_header_over_the_cap(tmp_path, tiny):
    path = broken(tmp_path, tiny, lambda h, d: None, header_len=HEADER_MAX_BYTES + 1)
    open_error(path, HeaderError, str(HEADER_MAX_BYTES + 1), "cap")


def test_header_crc_mismatch(tmp_path, tiny):
    open_error(broken(tmp_path, tiny, lambda h, d: None, crc=12345), ChecksumError, "header crc32")


def test_header_longer_than_the_file(tmp_path, tiny):
    open_error(broken(tmp_path, tiny, lambda h, d: None, header_len=len(tiny.raw)), TruncatedFileError, "header ends")


# --- header JSON --------------------------------------------------------------------------

@pytest.mark.parametrize("raw, needle", [
    (b"\xff\xfe{}", "UTF-8"),
    (b'{"format": "moepack",', "JSON"),
    (b"\xef\xbb\xbf{}", "JSON"),  # a byte-order mark is not JSON
    (b"[1, 2, 3]", "<root> must be an object"),
    (b'{"data_size": NaN}', "NaN"),
    (b'{"data_size": Infinity}', "Infinity"),
    (b'{"data_size": 1, "data_size": 2}', "'data_size' twice"),
    (b'{"data_size": ' + b"9" * 5000 + b"}", "JSON"),  # past Python's int-parsing digit limit
    (b"[" * 100_000 + b"]" * 100_000, "JSON"),  # nesting deeper than the recursion limit
], ids=["not-utf8", "cut-json", "bom", "array", "nan", "infinity", "duplicate-key", "huge-int", "deep-nesting"])
def test_header_not_utf8_json_object(tmp_path, tiny, raw, needle):
    open_error(put(tmp_path, assemble(raw, tiny.data)), HeaderError, needle)


def test_header_format_name(tmp_path, tiny):
    open_error(broken(tmp_path, tiny, lambda h, d: h.update(format="gguf")), HeaderError, "format='gguf'")


@pytest.mark.parametrize("where", ["<root>", "config", "tensors[0]", "expert_layout", "experts[0]", "recipe.experts"])
def test_unknown_header_key(tmp_path, tiny, where):
    def edit(h, d):
        target = {
            "<root>": h, "config": h["config"], "tensors[0]": h["tensors"][0], "expert_layout": h["expert_layout"],
            "experts[0]": h["experts"][0], "recipe.experts": h["recipe"]["experts"],
        }[where]
        target["comment"] = "hi"
    open_error(broken(tmp_path, tiny, edit), HeaderError, "unknown key", "'comment'")


@pytest.mark.parametrize("where, key", [
    ("<root>", "data_size"), ("config", "rope_theta"), ("tokenizer", "eos_token_ids"), ("quantizer", "method"),
    ("recipe", "router"), ("experts[1]", "crc32"),
])
def test_missing_header_key(tmp_path, tiny, where, key):
    def edit(h, d):
        target = h if where == "<root>" else h["experts"][1] if where == "experts[1]" else h[where]
        del target[key]
    open_error(broken(tmp_path, tiny, edit), HeaderError, "lacks", key)


@pytest.mark.parametrize("path, value, needle", [
    (("config", "hidden_size"), True, "config.hidden_size must be an integer"),  # a bool is no int
    (("config", "num_hidden_layers"), 1.0, "config.num_hidden_layers must be an integer"),
    (("config", "vocab_size"), 0, "config.vocab_size=0 is out of range"),
    (("config", "rms_norm_eps"), "1e-5", "config.rms_norm_eps must be a finite number"),
    (("config", "rope_theta"), -1.0, "config.rope_theta=-1.0 must be positive"),
    (("config", "tie_word_embeddings"), 0, "config.tie_word_embeddings must be true or false"),
    (("tensors", 1, "nbytes"), -32, "nbytes=-32 is out of range"),
    (("tensors", 1, "offset"), 4096.0, "offset must be an integer"),
    (("tensors", 1, "shape"), [16, 0], "shape[1]=0 is out of range"),
    (("tensors", 1, "crc32"), 2**32, "crc32=4294967296 is out of range"),
    (("tensors", 1, "name"), 7, "tensors[1].name must be a string"),
    (("experts", 0, "offset"), 4096.5, "experts[0].offset must be an integer"),
    (("experts", 0, "layer"), None, "experts[0].layer must be an integer"),
    (("expert_layout", "record_size"), "4096", "record_size must be an integer"),
    (("data_size",), -1, "data_size=-1 is out of range"),
    (("data_size",), 2**63, "out of range"),
    (("tensors",), {}, "tensors must be an array"),
    (("recipe", "experts", "bits"), 5, "recipe.experts.bits=5 is not one of"),
    (("recipe", "experts", "bits"), 16.0, "recipe.experts.bits must be an integer"),
    (("recipe", "experts", "group_size"), 12, "group size 12"),
    (("tokenizer", "eos_token_ids"), [2, -1], "eos_token_ids[1]=-1 is out of range"),
    (("expert_counts",), [[1, 2, 3]], "expert_counts must be [num_hidden_layers][num_local_experts]"),
    (("experts", 0, "rel_error"), [0.1, 0.2], "rel_error must list 3 numbers"),
])
def test_wrong_type_or_range(tmp_path, tiny, path, value, needle):
    def edit(h, d):
        target = h
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    open_error(broken(tmp_path, tiny, edit), HeaderError, needle)


def test_tensor_name_with_a_newline_keeps_the_message_one_line(tmp_path, tiny):
    open_error(broken(tmp_path, tiny, lambda h, d: h["tensors"][1].update(name="a\nb")), HeaderError, "'a\\nb'")


# --- config -------------------------------------------------------------------------------

def test_heads_not_a_multiple_of_kv_heads(tmp_path, tiny):
    edit = lambda h, d: h["config"].update(num_attention_heads=3, num_key_value_heads=2)  # noqa: E731
    open_error(broken(tmp_path, tiny, edit), HeaderError, "num_attention_heads=3", "num_key_value_heads=2")


def test_top_k_above_expert_count(tmp_path, tiny):
    edit = lambda h, d: h["config"].update(num_experts_per_tok=3)  # noqa: E731
    open_error(broken(tmp_path, tiny, edit), HeaderError, "num_experts_per_tok=3")


def test_odd_head_dim(tmp_path, tiny):
    open_error(broken(tmp_path, tiny, lambda h, d: h["config"].update(head_dim=7)), HeaderError, "head_dim=7")


# Validation must cost time in proportion to the header, not to what its config claims: a
# loop over 2**31 layers or a set of 2**62 (layer, expert) pairs would hang or exhaust memory.

def test_huge_claimed_layer_count_fails_fast(tmp_path, tiny):
    edit = lambda h, d: h["config"].update(num_hidden_layers=2**31)  # noqa: E731
    open_error(broken(tmp_path, tiny, edit), HeaderError, "lacks tensor 'model.layers.1.input_layernorm.weight' and")


def test_huge_claimed_expert_count_fails_fast(tmp_path, tiny):
    def edit(h, d):
        h["config"]["num_local_experts"] = 2**31
        _relayout(tiny.tensor(h, "model.layers.0.block_sparse_moe.gate.weight"), (2**31, 16), QuantSpec(16))
    open_error(broken(tmp_path, tiny, edit), HeaderError, "lacks expert 0.2 and")


# --- tensors ------------------------------------------------------------------------------

def _relayout(t: dict, shape: tuple[int, ...], spec: QuantSpec) -> None:
    """Give tensor entry `t` a new shape/spec with a self-consistent component list."""
    comps, nbytes = matrix_layout(shape, spec)
    t.update(shape=list(shape), quant=spec.to_json(), components=components_to_json(comps), nbytes=nbytes)


def test_tensor_missing(tmp_path, tiny):
    def edit(h, d):
        h["tensors"] = [t for t in h["tensors"] if t["name"] != NORM]
    open_error(broken(tmp_path, tiny, edit), HeaderError, f"lacks tensor {NORM!r}")


def test_tensor_extra(tmp_path, tiny):
    def edit(h, d):
        h["tensors"].append(dict(h["tensors"][1], name="model.layers.1.input_layernorm.weight"))
    open_error(broken(tmp_path, tiny, edit), HeaderError, "'model.layers.1.input_layernorm.weight' is not part")


@pytest.mark.parametrize("name", ["model.layers.00.input_layernorm.weight", "model.layers.0.mlp.weight", "lm_head"])
def test_tensor_name_not_a_mixtral_name(tmp_path, tiny, name):
    open_error(broken(tmp_path, tiny, lambda h, d: tiny.tensor(h, NORM).update(name=name)), HeaderError, repr(name))


def test_lm_head_listed_although_tied(tmp_path, tiny):
    open_error(broken(tmp_path, tiny, lambda h, d: h["config"].update(tie_word_embeddings=True)), HeaderError, "'lm_head.weight'")


def test_tensor_listed_twice(tmp_path, tiny):
    def edit(h, d):
        h["tensors"].append(dict(tiny.tensor(h, NORM)))
    open_error(broken(tmp_path, tiny, edit), HeaderError, f"{NORM!r} is listed twice")


def test_tensor_wrong_shape(tmp_path, tiny):
    open_error(broken(tmp_path, tiny, lambda h, d: _relayout(tiny.tensor(h, NORM), (32,), QuantSpec(16))),
               HeaderError, NORM, "[32]", "[16]")


def test_tensor_wrong_role(tmp_path, tiny):
    open_error(broken(tmp_path, tiny, lambda h, d: tiny.tensor(h, NORM).update(role="router")), HeaderError, NORM, "router/0")


def test_tensor_role_experts_is_not_a_tensor_role(tmp_path, tiny):
    open_error(broken(tmp_path, tiny, lambda h, d: tiny.tensor(h, NORM).update(role="experts")), HeaderError, "role='experts'")


def test_tensor_wrong_layer(tmp_path, tiny):
    open_error(broken(tmp_path, tiny, lambda h, d: tiny.tensor(h, NORM).update(layer=None)), HeaderError, NORM, "norms/None")


def test_tensor_spec_differs_from_recipe(tmp_path, tiny):
    edit = lambda h, d: _relayout(tiny.tensor(h, Q_PROJ), (16, 16), QuantSpec(4, 16, 16, 0))  # noqa: E731
    open_error(broken(tmp_path, tiny, edit), HeaderError, Q_PROJ, "recipe.attention")


def test_tensor_nbytes_differs_from_layout(tmp_path, tiny):
    open_error(broken(tmp_path, tiny, lambda h, d: tiny.tensor(h, NORM).update(nbytes=64)), LayoutError, NORM, "nbytes=64")


@pytest.mark.parametrize("role", ["embeddings", "norms", "router"])
def test_fp16_only_role_quantized(tmp_path, tiny, role):
    open_error(broken(tmp_path, tiny, lambda h, d: h["recipe"].update({role: QuantSpec(4, 16, 16, 0).to_json()})),
               HeaderError, f"recipe.{role} must be 16")


# --- components ---------------------------------------------------------------------------

@pytest.mark.parametrize("edit_component", [
    lambda cs: cs[1].update(offset=cs[1]["offset"] + 8),  # not where the layout puts it
    lambda cs: cs[0].update(dtype="f16"),
    lambda cs: cs[0].update(shape=[16, 16]),
    lambda cs: cs.reverse(),  # components must come in layout order
    lambda cs: cs.pop(),
    lambda cs: cs[0].update(name="weight"),
])
def test_components_must_match_the_derived_layout(tmp_path, tiny, edit_component):
    open_error(broken(tmp_path, tiny, lambda h, d: edit_component(tiny.tensor(h, Q_PROJ)["components"])),
               HeaderError, Q_PROJ, "does not match the layout")


def test_expert_components_must_match_the_derived_layout(tmp_path, tiny):
    def edit(h, d):
        h["expert_layout"]["matrices"][2]["components"][0]["offset"] = 64
    open_error(broken(tmp_path, tiny, edit), HeaderError, "expert_layout.matrices[2].components")


def test_component_dtype_unknown(tmp_path, tiny):
    edit = lambda h, d: tiny.tensor(h, Q_PROJ)["components"][0].update(dtype="i4")  # noqa: E731
    open_error(broken(tmp_path, tiny, edit), HeaderError, "dtype='i4'")


# --- expert layout ------------------------------------------------------------------------

def test_expert_record_size_not_a_multiple_of_4096(tmp_path, tiny):
    edit = lambda h, d: h["expert_layout"].update(record_size=ALIGNMENT + 64)  # noqa: E731
    open_error(broken(tmp_path, tiny, edit), LayoutError, f"record_size={ALIGNMENT + 64}")


def test_expert_record_size_too_small(tmp_path, tiny):
    edit = lambda h, d: h["expert_layout"]["matrices"][2].update(offset=ALIGNMENT)  # noqa: E731
    open_error(broken(tmp_path, tiny, edit), LayoutError, "record_size=4096")


def test_expert_matrices_out_of_order(tmp_path, tiny):
    edit = lambda h, d: h["expert_layout"]["matrices"].reverse()  # noqa: E731
    open_error(broken(tmp_path, tiny, edit), HeaderError, "['w1', 'w3', 'w2']")


def test_expert_matrices_overlap(tmp_path, tiny):
    edit = lambda h, d: h["expert_layout"]["matrices"][1].update(offset=64)  # noqa: E731
    open_error(broken(tmp_path, tiny, edit), LayoutError, "expert matrix w3", "overlaps")


def test_expert_matrix_misaligned(tmp_path, tiny):
    edit = lambda h, d: h["expert_layout"]["matrices"][1].update(offset=h["expert_layout"]["matrices"][1]["offset"] + 4)  # noqa: E731
    open_error(broken(tmp_path, tiny, edit), LayoutError, "expert matrix w3", "misaligned")


def test_expert_matrix_nbytes(tmp_path, tiny):
    edit = lambda h, d: h["expert_layout"]["matrices"][0].update(nbytes=1)  # noqa: E731
    open_error(broken(tmp_path, tiny, edit), HeaderError, "matrices[0].nbytes=1")


def test_expert_matrix_spec_differs_from_recipe(tmp_path, tiny):
    edit = lambda h, d: h["recipe"].update(experts=QuantSpec(2, 16, 8, 8).to_json())  # noqa: E731
    open_error(broken(tmp_path, tiny, edit), HeaderError, "expert matrix w1", "recipe.experts")


def test_expert_listed_twice(tmp_path, tiny):
    open_error(broken(tmp_path, tiny, lambda h, d: h["experts"][1].update(expert=0)), HeaderError, "expert 0.0 is listed twice")


def test_expert_missing(tmp_path, tiny):
    open_error(broken(tmp_path, tiny, lambda h, d: h["experts"].pop()), HeaderError, "lacks expert 0.1")


def test_expert_out_of_range(tmp_path, tiny):
    open_error(broken(tmp_path, tiny, lambda h, d: h["experts"][1].update(layer=1)), HeaderError, "expert 1.1 does not exist")


# --- byte ranges --------------------------------------------------------------------------

def test_record_offset_misaligned(tmp_path, tiny):
    open_error(broken(tmp_path, tiny, lambda h, d: tiny.tensor(h, NORM).update(offset=ALIGNMENT + 64)),
               LayoutError, NORM, "not a multiple of 4096")


def test_records_overlap(tmp_path, tiny):
    def edit(h, d):
        tiny.tensor(h, NORM)["offset"] = 0  # the embeddings live there
    open_error(broken(tmp_path, tiny, edit), LayoutError, "overlap")


def test_expert_records_overlap(tmp_path, tiny):
    open_error(broken(tmp_path, tiny, lambda h, d: h["experts"][1].update(offset=h["experts"][0]["offset"])),
               LayoutError, "expert 0.", "overlap")


def test_record_past_the_end_of_data(tmp_path, tiny):
    def edit(h, d):
        last = max(h["tensors"], key=lambda t: t["offset"])
        last["offset"] += ALIGNMENT
    open_error(broken(tmp_path, tiny, edit), LayoutError, "run past the data section")


def test_data_size_beyond_the_last_record(tmp_path, tiny):
    def edit(h, d):
        h["data_size"] += ALIGNMENT
        d.extend(bytes(ALIGNMENT))  # the file is as long as the header claims, so only the rule trips
    open_error(broken(tmp_path, tiny, edit), LayoutError, "last record ends at")


# --- file length and padding --------------------------------------------------------------

def test_file_truncated(tmp_path, tiny):
    open_error(put(tmp_path, tiny.raw[:-1]), TruncatedFileError, f"file is {len(tiny.raw) - 1} bytes")


def test_empty_file_is_truncated(tmp_path):
    open_error(put(tmp_path, b""), TruncatedFileError, "file is 0 bytes")


def test_trailing_bytes(tmp_path, tiny):
    open_error(put(tmp_path, tiny.raw + b"\0"), LayoutError, "1 bytes after the end")


def test_nonzero_padding_between_header_and_data(tmp_path, tiny):
    header, data = tiny.edited()
    raw = bytearray(tiny.raw)
    start = len(raw) - len(data)
    raw[start - 1] = 1
    open_error(put(tmp_path, bytes(raw)), LayoutError, "padding")


# --- opening something that is no file, checksums -----------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(MoepackError) as info:
        MoepackFile(tmp_path / "nope.moepack")
    check_message(info.value, "nope.moepack", "no such file")


def test_directory_path(tmp_path):
    with pytest.raises(MoepackError) as info:
        MoepackFile(tmp_path)
    check_message(info.value, "not a regular file")


@pytest.mark.parametrize("which", ["tensor", "expert"])
def test_verify_names_the_damaged_record(tmp_path, tiny, which):
    header, data = tiny.edited()
    if which == "tensor":
        t = tiny.tensor(header, Q_PROJ)
        data[t["offset"] + t["nbytes"] - 1] ^= 0x01
        label = f"tensor {Q_PROJ}"
    else:
        e = header["experts"][1]
        data[e["offset"] + header["expert_layout"]["record_size"] - 1] ^= 0x80  # padding is covered too
        label = "expert 0.1"
    f = MoepackFile(put(tmp_path, assemble(header, bytes(data))))  # opening does not read records
    with pytest.raises(ChecksumError) as info:
        f.verify()
    check_message(info.value, label, "crc32")


def test_header_bytes_are_canonical(tiny):
    # the writer's header is sorted, whitespace-free JSON: re-serialising it changes nothing
    raw = tiny.raw[32 : 32 + len(canonical(tiny.header))]
    assert raw == canonical(tiny.header)
