"""Test helpers: .moepack files from a tiny HF checkpoint without the real quantizer
(fp16 copies, or min-max round-to-nearest codes), and transformers reference models that
carry exactly the weights a file decodes to."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from formats import MoepackFile, MoepackWriter, QuantSpec, QuantizerInfo, Recipe, TokenizerInfo, encode_matrix
from formats.header import ModelConfig
from formats.layout import expected_tensors

FP16 = QuantSpec(16)

# Tolerance for two CPU paths of one model that may reach runtime.cpu_expert with inputs that
# differ in the last float bits (another attention path, another token grouping): its compiled
# kernel rounds activations to integers per word of codes (2^-13.7 of the word's largest |x| for
# 2-bit codes, whose pairs are telescoped), so such a difference can move a rounding step: up to
# ~1e-3 on the tiny models' logits (2.5e-4 at 2^-16 steps). A wrong expert, slot or cache entry
# moves logits by 1e-2 or more.
CPU_KERNEL_TOL = 2e-3


def recipe(attention: QuantSpec = FP16, experts: QuantSpec = FP16, lm_head: QuantSpec | None = None) -> Recipe:
    return Recipe({
        "embeddings": FP16, "attention": attention, "norms": FP16, "router": FP16, "experts": experts,
        "lm_head": lm_head if lm_head is not None else attention,
    })


RECIPE_16 = recipe()
RECIPE_4_2 = recipe(QuantSpec(4, 64, 8, 256), QuantSpec(2, 16, 8, 128))
RECIPE_4_3 = recipe(QuantSpec(4, 64, 16), QuantSpec(3, 64, 8, 128), lm_head=FP16)
# experts with 4-bit meta codes (format version 2)
RECIPE_4_2_M4 = recipe(QuantSpec(4, 64, 8, 256), QuantSpec(2, 16, 4, 128))


def checkpoint_config(folder: Path) -> ModelConfig:
    c = json.loads((folder / "config.json").read_text())
    theta = c.get("rope_theta") or c["rope_parameters"]["rope_theta"]
    return ModelConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
        num_local_experts=c["num_local_experts"], num_experts_per_tok=c["num_experts_per_tok"],
        rms_norm_eps=c["rms_norm_eps"], rope_theta=float(theta), max_position_embeddings=c["max_position_embeddings"],
        tie_word_embeddings=c["tie_word_embeddings"], sliding_window=c.get("sliding_window"),
    )


def checkpoint_tokenizer(folder: Path) -> TokenizerInfo:
    c = json.loads((folder / "config.json").read_text())
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    return TokenizerInfo(
        tokenizer_json=(folder / "tokenizer.json").read_text(), chat_template=tc.get("chat_template"),
        bos_token_id=c["bos_token_id"], eos_token_ids=(c["eos_token_id"],), add_bos_token=tc.get("add_bos_token", True),
    )


def checkpoint_tensors(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update({k: v.astype(np.float32) for k, v in load_file(shard).items()})
    return out


def rtn_quantize(w: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min-max round-to-nearest: codes [rows, cols], scale and zero per group (row-major)."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // spec.group_size, spec.group_size).astype(np.float32)
    lo, hi = g.min(-1), g.max(-1)
    scale = np.maximum((hi - lo) / ((1 << spec.bits) - 1), 1e-8).astype(np.float32)
    zero = (-lo / scale).astype(np.float32)
    q = np.clip(np.rint(g / scale[..., None] + zero[..., None]), 0, (1 << spec.bits) - 1).astype(np.uint8)
    return q.reshape(rows, cols), scale.reshape(-1), zero.reshape(-1)


def encode(w: np.ndarray, spec: QuantSpec) -> bytes:
    if not spec.quantized:
        return encode_matrix(spec, weight=w)
    q, scale, zero = rtn_quantize(w, spec)
    return encode_matrix(spec, q=q, scale=scale, zero=zero)


def write_moepack(folder: Path, out: Path, rcp: Recipe, with_tokenizer: bool = True,
                  tokenizer: TokenizerInfo | None = None) -> Path:
    """A .moepack of the checkpoint in `folder` stored with `rcp` (quantized by RTN); the
    checkpoint's tokenizer unless `tokenizer` is given or `with_tokenizer` is False."""
    cfg = checkpoint_config(folder)
    weights = checkpoint_tensors(folder)
    tok = tokenizer or (checkpoint_tokenizer(folder) if with_tokenizer else TokenizerInfo())
    quantizer = QuantizerInfo("tests", "0", "rtn-minmax", "0", str(folder))
    with MoepackWriter(out, config=cfg, tokenizer=tok, quantizer=quantizer, recipe=rcp) as w:
        for name, (role, layer, shape) in expected_tensors(cfg).items():
            w.add_tensor(name, role, layer, shape, encode(weights[name], rcp[role]))
        for L in range(cfg.num_hidden_layers):
            for e in range(cfg.num_local_experts):
                p = f"model.layers.{L}.block_sparse_moe.experts.{e}."
                w.add_expert(L, e, {m: encode(weights[p + m + ".weight"], rcp["experts"]) for m in ("w1", "w3", "w2")})
        return w.finish()


def reference_model(folder: Path, file: MoepackFile | None = None):
    """transformers' MixtralForCausalLM in float32 from `folder`; with `file`, every weight is
    replaced by the file's reference decoding (formats' numpy decode_matrix)."""
    import torch
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if file is None:
        return model
    cfg = file.config
    sd = {name: torch.from_numpy(file.tensor_array(name).copy()) for name in expected_tensors(cfg)}
    for L in range(cfg.num_hidden_layers):
        p = f"model.layers.{L}."
        sd[p + "mlp.gate.weight"] = sd.pop(p + "block_sparse_moe.gate.weight")
        experts = [file.expert_arrays(L, e) for e in range(cfg.num_local_experts)]
        # transformers 5 keeps experts fused: gate_up_proj [E, 2I, H] = (w1; w3), down_proj [E, H, I]
        sd[p + "mlp.experts.gate_up_proj"] = torch.from_numpy(np.stack([np.concatenate([x["w1"], x["w3"]]) for x in experts]))
        sd[p + "mlp.experts.down_proj"] = torch.from_numpy(np.stack([x["w2"] for x in experts]))
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True)
    return model
