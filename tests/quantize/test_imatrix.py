"""`moe-pack imatrix` and `moe-pack quantize --imatrix`: what is measured equals a direct
computation, the file round-trips and refuses damage one error at a time, and quantizing
with it is deterministic and recorded in the header."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from formats.reader import MoepackFile
from quantize import imatrix as im
from runtime.loader import load_model
from runtime.tokenizer import TextTokenizer
from tests.quantize.helpers import one_torch_thread  # noqa: F401 (autouse fixture)
from tests.quantize.helpers import assert_user_error, packed, run_cli, sha256

TEXT = ("Experts live in host memory and stream to the GPU on demand. " * 6
        + "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 4)
CTX = 16


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, tiny_checkpoint):
    return packed(tmp_path_factory, tiny_checkpoint, "--attn-bits", "4", "--expert-bits", "4")


@pytest.fixture(scope="module")
def measured(model_file):
    return im.measure(model_file, TEXT, ctx=CTX, device="cpu", progress=False)


def _reference(model_file):
    """Per (layer, expert): the routed x rows, read by a spy backend over the same windows."""
    with MoepackFile(model_file) as f:
        tok = TextTokenizer(f.header.tokenizer)
        ids = tok.encode(TEXT, add_bos=False)
        assert f.header.tokenizer.add_bos_token and tok.bos_id is not None  # the windows start with BOS
        windows = [[tok.bos_id] + ids[s:s + CTX - 1] for s in range(0, len(ids), CTX - 1)]
        model, _ = load_model(f, torch.device("cpu"), torch.float32, ctx=CTX, dequantize_at_load=True)
        rows: dict[tuple[int, int], list[torch.Tensor]] = {}
        inner = model.experts

        class Spy:
            def forward(self, layer, x, idx, w):
                for e in range(f.config.num_local_experts):
                    hit = (idx == e).any(dim=1)
                    if hit.any():
                        rows.setdefault((layer, e), []).append(x[hit].clone())
                return inner.forward(layer, x, idx, w)

        model.experts = Spy()
        with torch.inference_mode():
            for w in windows:
                if len(w) >= 2:
                    model(torch.tensor(w), 0)
        arrays = {key: f.expert_arrays(*key) for key in rows}
    return [w for w in windows if len(w) >= 2], {k: torch.cat(v).double().numpy() for k, v in rows.items()}, arrays


def test_expert_inputs_equal_a_direct_computation(model_file, measured):
    windows, rows, arrays = _reference(model_file)
    assert measured.tokens == sum(len(w) for w in windows)
    for (layer, e), x in rows.items():
        name = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
        mean, n = measured.entries[name + "w1.weight"]
        assert n == x.shape[0] and measured.entries[name + "w3.weight"][1] == n
        np.testing.assert_allclose(mean, (x * x).mean(0), rtol=1e-5, atol=1e-9)
        w1, w3 = arrays[(layer, e)]["w1"].astype(np.float64), arrays[(layer, e)]["w3"].astype(np.float64)
        a = x @ w1.T
        h = a / (1 + np.exp(-a)) * (x @ w3.T)
        mean2, n2 = measured.entries[name + "w2.weight"]
        assert n2 == n
        np.testing.assert_allclose(mean2, (h * h).mean(0), rtol=1e-4, atol=1e-9)


def test_attention_inputs_cover_every_token_and_layer(model_file, measured):
    with MoepackFile(model_file) as f:
        cfg = f.config
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}.self_attn."
        q, n = measured.entries[p + "q_proj.weight"]
        assert n == measured.tokens and q.shape == (cfg.hidden_size,) and bool((q > 0).all())
        for other in ("k_proj", "v_proj"):
            assert np.array_equal(measured.entries[p + other + ".weight"][0], q)
        o, n_o = measured.entries[p + "o_proj.weight"]
        assert n_o == measured.tokens and o.shape == (cfg.num_attention_heads * cfg.head_dim,)
        routed = sum(measured.entries[f"model.layers.{layer}.block_sparse_moe.experts.{e}.w1.weight"][1]
                     for e in range(cfg.num_local_experts)
                     if f"model.layers.{layer}.block_sparse_moe.experts.{e}.w1.weight" in measured.entries)
        assert routed == cfg.num_experts_per_tok * measured.tokens


def test_holding_fewer_rows_gives_the_same_means(model_file, measured, monkeypatch):
    monkeypatch.setattr(im, "HOLD_BYTES", 1)  # h computed after every window
    again = im.measure(model_file, TEXT, ctx=CTX, device="cpu", progress=False)
    assert again.entries.keys() == measured.entries.keys()
    for k, (mean, n) in measured.entries.items():
        assert again.entries[k][1] == n
        np.testing.assert_allclose(again.entries[k][0], mean, rtol=1e-6)


def test_save_load_round_trip_and_same_bytes(measured, tmp_path):
    a, b = tmp_path / "a.imatrix", tmp_path / "b.imatrix"
    im.save(measured, a)
    im.save(measured, b)
    assert a.read_bytes() == b.read_bytes() and not list(tmp_path.glob("*.tmp"))
    back = im.load(a)
    assert back.tokens == measured.tokens and back.text_sha256 == measured.text_sha256
    assert back.entries.keys() == measured.entries.keys()
    for k, (mean, n) in measured.entries.items():
        assert back.entries[k][1] == n and np.array_equal(back.entries[k][0], mean)


# ------------------------------------------------------------------------------ damaged files


def _write(path, tensors: dict, meta: dict | None):
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata=meta)
    return path


GOOD_META = {"format": im.FORMAT, "version": im.VERSION, "tokens": "5", "text_sha256": "ab", "model": "m"}
NAME = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("tensors,meta,needle", [
    ({NAME + im.MEAN: np.ones(4, np.float32), NAME + im.ROWS: np.array([3])}, {**GOOD_META, "format": "gguf"},
     "not a moe-pack importance matrix"),
    ({NAME + im.MEAN: np.ones(4, np.float32), NAME + im.ROWS: np.array([3])}, None, "not a moe-pack importance matrix"),
    ({NAME + im.MEAN: np.ones(4, np.float32), NAME + im.ROWS: np.array([3])}, {**GOOD_META, "version": "9"},
     "importance matrix version '9'"),
    ({NAME + im.MEAN: np.ones(4, np.float32), NAME + im.ROWS: np.array([3])}, {**GOOD_META, "tokens": "x"},
     "tokens 'x' is not an integer"),
    ({NAME + im.MEAN: np.ones(4, np.float32)}, GOOD_META, "rows is missing"),
    ({NAME + im.MEAN: np.ones(4, np.float32), NAME + im.ROWS: np.array([-1])}, GOOD_META, "rows is missing or not"),
    ({NAME + im.MEAN: np.ones(4, np.float32), NAME + im.ROWS: np.array([3], np.int32)}, GOOD_META, "rows is I32"),
    ({NAME + im.ROWS: np.array([3])}, GOOD_META, "has no .in_sq_mean beside it"),
    ({NAME + im.MEAN: np.array([1, -1], np.float32), NAME + im.ROWS: np.array([3])}, GOOD_META, "finite non-negative"),
    ({NAME + im.MEAN: np.array([1, np.nan], np.float32), NAME + im.ROWS: np.array([3])}, GOOD_META, "finite non-negative"),
    ({NAME + im.MEAN: np.ones(4, np.float64), NAME + im.ROWS: np.array([3])}, GOOD_META, "in_sq_mean is F64"),
    ({NAME + im.MEAN: np.ones((2, 2), np.float32), NAME + im.ROWS: np.array([3])}, GOOD_META, "1-D float32"),
    ({"what": np.ones(2, np.float32)}, GOOD_META, "unexpected tensor what"),
])
def test_each_kind_of_damage_is_refused_with_its_own_error(tmp_path, tensors, meta, needle):
    path = _write(tmp_path / "x.imatrix", tensors, meta)
    with pytest.raises(im.ImatrixError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        im.load(path)


@pytest.mark.parametrize("dtype,size", [("BF16", 2), ("F16", 2), ("F8_E4M3", 1)])
def test_a_tensor_of_another_dtype_is_refused(tmp_path, dtype, size):
    """Valid safetensors whose dtype numpy cannot hold: an error naming it, not a traceback."""
    n = 4 * size
    header = {"__metadata__": GOOD_META, NAME + im.MEAN: {"dtype": dtype, "shape": [4], "data_offsets": [0, n]},
              NAME + im.ROWS: {"dtype": "I64", "shape": [1], "data_offsets": [n, n + 8]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "x.imatrix"
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(n + 8))
    with pytest.raises(im.ImatrixError, match=f"is {dtype}"):
        im.load(path)


def test_not_safetensors_at_all(tmp_path):
    bad = tmp_path / "x.imatrix"
    bad.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(im.ImatrixError, match="not a safetensors file"):
        im.load(bad)
    with pytest.raises(im.ImatrixError, match="no such importance matrix"):
        im.load(tmp_path / "missing.imatrix")


def test_truncated_at_every_offset_is_refused(measured, tmp_path):
    small = im.Imatrix(entries=dict(list(measured.entries.items())[:2]), tokens=3, text_sha256="s", model="m")
    good = tmp_path / "good.imatrix"
    im.save(small, good)
    data = good.read_bytes()
    bad = tmp_path / "cut.imatrix"
    for cut in range(len(data)):
        bad.write_bytes(data[:cut])
        with pytest.raises(im.ImatrixError):
            im.load(bad)


# ------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def imatrix_file(model_file, tmp_path_factory):
    text = tmp_path_factory.mktemp("calib") / "calib.txt"
    text.write_text(TEXT)
    out = text.with_name("tiny.imatrix")
    r = run_cli("imatrix", model_file, text, "-o", out, "--ctx", str(CTX), "--device", "cpu", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert "wrote" in r.stdout and "expert and" in r.stdout
    return out


def test_quantize_with_imatrix_is_deterministic_and_recorded(tiny_checkpoint, imatrix_file, tmp_path, tmp_path_factory):
    a, b = tmp_path / "a.moepack", tmp_path / "b.moepack"
    measured = sum(1 for _, rows in im.load(imatrix_file).entries.values() if rows > 0)
    for out in (a, b):
        r = run_cli("quantize", tiny_checkpoint, "-o", out, "--imatrix", imatrix_file, "--device", "cpu", "--quiet")
        assert r.exit_code == 0, r.stderr
        # every measured matrix found by its name; the rest (experts never routed to) alike
        with MoepackFile(out) as f:
            quantized = sum(1 for t in f.header.tensors if t.spec.quantized) + 3 * len(f.header.experts)
        equal = f", {quantized - measured} with equal weights (not measured)" if quantized > measured else ""
        assert f"weighted by {imatrix_file}: {measured} matrices{equal}, cpu" in r.stdout
    assert sha256(a) == sha256(b)
    hqq = packed(tmp_path_factory, tiny_checkpoint, "--attn-bits", "4", "--expert-bits", "2")
    assert sha256(a) != sha256(hqq)
    with MoepackFile(a) as f:
        f.verify()
        q = f.header.quantizer
        assert q.method == "weighted-lsq" and imatrix_file.name in q.method_version and "sha256:" in q.method_version
    report = json.loads(run_cli("inspect", a, "--json").stdout)
    assert report["quantizer"]["method"] == "weighted-lsq"


def test_an_imatrix_of_another_model_is_refused_before_any_work(tiny_checkpoint, tmp_path):
    other = im.Imatrix(entries={NAME: (np.ones(7, np.float32), 3)}, tokens=3, text_sha256="s", model="other")
    path = tmp_path / "other.imatrix"
    im.save(other, path)
    out = tmp_path / "out.moepack"
    r = run_cli("quantize", tiny_checkpoint, "-o", out, "--imatrix", path, "--device", "cpu", "--quiet")
    assert_user_error(r, "has 7 input columns", NAME)
    assert not out.exists()
    unrelated = im.Imatrix(entries={"model.layers.99.self_attn.q_proj.weight": (np.ones(7, np.float32), 3)},
                           tokens=3, text_sha256="s", model="other")
    im.save(unrelated, path)
    assert_user_error(run_cli("quantize", tiny_checkpoint, "-o", out, "--imatrix", path, "--quiet"),
                      "no importances for any quantized matrix")
    assert_user_error(run_cli("quantize", tiny_checkpoint, "-o", out, "--imatrix", tmp_path / "none.imatrix"),
                      "no such importance matrix")
    assert not out.exists()


def test_imatrix_cli_errors_are_one_line(model_file, tmp_path, tiny_checkpoint, imatrix_file):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert_user_error(run_cli("imatrix", model_file, text, "-o", model_file), "would overwrite an input")
    assert_user_error(run_cli("quantize", tiny_checkpoint, "-o", tmp_path / "o.moepack", "--attn-bits", "16",
                              "--expert-bits", "16", "--imatrix", imatrix_file), "quantizes no matrix")
    assert_user_error(run_cli("imatrix", model_file, tmp_path / "missing.txt", "-o", tmp_path / "x.imatrix"),
                      "no such text file")
    assert_user_error(run_cli("imatrix", model_file, text, "-o", tmp_path / "x.imatrix", "--ctx", "1"), "--ctx 1")
    assert_user_error(run_cli("imatrix", model_file, text, "-o", tmp_path / "nodir" / "x.imatrix"),
                      "does not exist")
    text.write_text(" ")
    assert_user_error(run_cli("imatrix", model_file, text, "-o", tmp_path / "x.imatrix", "--device", "cpu", "-q"),
                      "the text is empty")
    from formats.errors import ConfigError

    with pytest.raises(ConfigError, match="fewer than 2 tokens"):  # BOS alone is one
        im.measure(model_file, "", device="cpu", progress=False)
    assert not (tmp_path / "x.imatrix").exists()
