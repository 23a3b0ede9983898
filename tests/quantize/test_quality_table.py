"""tools/quality_table.py and tools/hqq_reference.py: the text, hqq's fp16-meta reference, and
the method on tiny models: hqq's reconstruction in transformers must measure what a
`--meta-bits 16` .moepack file measures in the moe-pack runtime, holding the same codes, so
the table's gap is the 8-bit meta and nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from formats.qtensor import QuantSpec, component_views, decode_matrix, encode_matrix
from quantize.hqq_codec import hqq_quantize
from tools.hqq_reference import Reference, hqq_fp16_meta, row_permutation
from tools.quality_table import Config, reference_text


def test_reference_text_is_deterministic_prose():
    text, desc = reference_text()
    again, _ = reference_text()
    assert text == again and len(text) > 100_000
    assert "pydoc_data.topics" in desc and "sha256" in desc
    lines = [ln for ln in text.splitlines() if ln]
    assert not any(ln[:1].isspace() or ln.startswith(">>>") or "::=" in ln for ln in lines), "code or grammar left in"
    assert not any(set(ln) <= set("*=-~^\"") for ln in lines), "heading underline left in"
    assert "Assert statements are a convenient way to insert debugging assertions into a program:" in text


def test_config_parse():
    assert Config.parse("4/2") == Config(4, 2) and Config(4, 2).name == "4/2"
    assert Config(4, 3).group(4) == 64 and Config(2, 2).group(2) == 16 and Config(16, 16).group(16) is None


@pytest.mark.parametrize("bits,group", [(2, 16), (3, 64), (4, 64)])
def test_hqq_reference_is_moepack_meta16_decode(bits, group):
    """Same codes as moe-pack's quantizer, and the same weights a --meta-bits 16 file decodes to."""
    g = torch.Generator().manual_seed(bits)
    W = (torch.randn(48, 256, generator=g) * 0.05).half()
    W_r, nbytes, codes = hqq_fp16_meta(W, bits, group)
    spec = QuantSpec(bits, group, 16, 0)
    q, scale, zero = hqq_quantize(W, spec, "cpu")
    np.testing.assert_array_equal(codes.numpy(), q)
    payload = encode_matrix(spec, q=q, scale=scale, zero=zero)
    decoded = decode_matrix(component_views(payload, (48, 256), spec), (48, 256), spec)
    np.testing.assert_array_equal(W_r.numpy(), decoded)
    n_groups = 48 * 256 // group
    packed = {2: 48 * 256 // 4, 4: 48 * 256 // 2, 3: -(-n_groups // 10) * group * 4}[bits]  # hqq: 10 codes per int32 at 3 bits
    assert nbytes == packed + 4 * n_groups
    err = float((W_r - W.float()).norm() / W.float().norm())
    assert 0 < err < {2: 0.45, 3: 0.25, 4: 0.12}[bits]


def test_row_permutation():
    W = torch.randn(6, 4).half()
    index = {r.tobytes(): i for i, r in enumerate(W.numpy())}
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    assert torch.equal(row_permutation(index, W[perm]), perm)
    other = W[perm].clone()
    other[2, 1] += 1
    assert row_permutation(index, other) is None


def permuted_experts_checkpoint(src: Path, out: Path) -> Path:
    """`src` with every layer's experts replaced by shuffled copies of its expert 0 (what
    quantize.gguf_to_mixtral makes): w1/w3 rows and w2 columns permuted alike."""
    from transformers import MixtralForCausalLM

    m = MixtralForCausalLM.from_pretrained(src, dtype=torch.float16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in m.model.layers:
            ex = layer.mlp.experts
            I = ex.down_proj.shape[-1]
            for e in range(1, ex.gate_up_proj.shape[0]):
                perm = torch.randperm(I, generator=g)
                ex.gate_up_proj[e, :I] = ex.gate_up_proj[0, :I][perm]
                ex.gate_up_proj[e, I:] = ex.gate_up_proj[0, I:][perm]
                ex.down_proj[e] = ex.down_proj[0][:, perm]
    m.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)
    return out


@pytest.fixture(scope="module")
def tiny_folders(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    return {"random": tiny_checkpoint,
            "permuted": permuted_experts_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("perm") / "ckpt")}


@pytest.fixture(scope="module")
def references(tiny_folders) -> dict[str, Reference]:
    return {k: Reference(v) for k, v in tiny_folders.items()}


def test_reference_swaps_roles_and_restores_originals(references):
    ref = references["random"]
    orig = {n: p.detach().clone() for n, p in ref.model.named_parameters()}
    ref.set_role("attention", 4, 64)
    ref.set_role("experts", 2, 16)
    params = dict(ref.model.named_parameters())
    changed = {n for n in orig if not torch.equal(orig[n], params[n])}
    assert any("q_proj" in n for n in changed) and any("gate_up_proj" in n for n in changed)
    assert any("down_proj" in n for n in changed)
    assert not any("norm" in n or "embed" in n or "lm_head" in n or "mlp.gate." in n for n in changed)
    assert ref.nbytes < sum(p.numel() * 2 for p in params.values())
    assert ref.set_role("experts", 2, 16) == 0.0, "an unchanged role is not quantized again"
    ref.set_role("attention", 16, None)
    ref.set_role("experts", 16, None)
    assert all(torch.equal(orig[n], p) for n, p in ref.model.named_parameters())
    assert ref.nbytes == sum(p.numel() * 2 for p in params.values())


@pytest.mark.parametrize("kind,attn_bits,expert_bits", [("random", 4, 2), ("random", 2, 3), ("permuted", 4, 4)])
def test_reference_measures_what_a_meta16_file_measures(references, tiny_folders, tmp_path, kind, attn_bits, expert_bits):
    from formats.reader import MoepackFile
    from quantize.convert import quantize_checkpoint
    from quantize.recipe import DEFAULT_GROUP_SIZE, QuantRecipe
    from runtime.loader import load_model
    from runtime.perplexity import evaluate, model_logits_fn
    from runtime.tokenizer import TextTokenizer
    from tests.tiny import TRAINING_TEXT

    ref, folder = references[kind], tiny_folders[kind]
    out = tmp_path / "m16.moepack"
    quantize_checkpoint(str(folder), out, QuantRecipe(attn_bits=attn_bits, expert_bits=expert_bits, meta_bits=16),
                        device="cpu", progress=False)
    model, mf = load_model(out, torch.device("cpu"), torch.float32, ctx=64, dequantize_at_load=True)
    ids = TextTokenizer(mf.header.tokenizer).encode(TRAINING_TEXT * 2, add_bos=False)
    ours = evaluate(model_logits_fn(model), ids, 64, bos_token_id=1)
    before = ref.permuted
    ref.set_role("attention", attn_bits, DEFAULT_GROUP_SIZE[attn_bits])
    ref.set_role("experts", expert_bits, DEFAULT_GROUP_SIZE[expert_bits])
    theirs = evaluate(ref.logits_fn(), ids, 64, bos_token_id=1)
    assert ours.perplexity == pytest.approx(theirs.perplexity, rel=1e-4)
    cfg = mf.config
    E, L = cfg.num_local_experts, cfg.num_hidden_layers
    if kind == "permuted":  # w1 and w3 of experts 1.. come from expert 0 by a row permutation
        assert ref.permuted - before == L * (E - 1) * 2
    else:
        assert ref.permuted == before
    n, bad = ref.check_file(MoepackFile(out))
    assert (n, bad) == (L * 4 + L * E * 3, [])
    # a check that cannot fail is no check
    key = (0, 1, "w2")
    ref.codes["experts"][key] = ref.codes["experts"][key] ^ 1
    assert ref.check_file(MoepackFile(out))[1] == [key]
    # requantize redoes a matrix in full: codes and weights back to hqq's
    ref.layers[0].mlp.experts.down_proj.data[1].zero_()
    ref.requantize([key])
    assert ref.check_file(MoepackFile(out))[1] == []
    W_r, _, _ = hqq_fp16_meta(ref.orig["0.down_proj"][1].contiguous(), expert_bits, DEFAULT_GROUP_SIZE[expert_bits])
    assert torch.equal(ref.layers[0].mlp.experts.down_proj[1], W_r)
