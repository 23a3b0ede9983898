"""Build a MixtralModel from a .moepack file: non-expert tensors onto the compute device
(crc-checked, they are small), experts through a pluggable backend."""

from __future__ import annotations

import os
from typing import Callable

import torch

from formats.reader import MoepackFile

from .attention import Attention
from .cpu_native import set_auto_activations
from .dequant import component_tensors, dequantize
from .experts import ExpertBackend, host_tensor, resident_experts
from .graphs import graphs_supported
from .model import DecoderLayer, MixtralModel
from .moe import MoEBlock
from .qlinear import HalfLinear, make_linear
from .rmsnorm import RMSNorm

BackendFactory = Callable[[MoepackFile, MixtralModel, torch.device, torch.dtype], ExpertBackend]
DEFAULT_MAX_CTX = 4096


def default_ctx(file: MoepackFile) -> int:
    return min(file.config.max_position_embeddings, DEFAULT_MAX_CTX)


def load_model(
    path_or_file: str | os.PathLike | MoepackFile,
    device: torch.device,
    dtype: torch.dtype,
    expert_backend_factory: BackendFactory | None = None,
    *,
    ctx: int | None = None,
    dequantize_at_load: bool = False,
    verify_tensors: bool = True,
    cuda_graphs: bool | None = None,
    fuse_qkv: bool = True,
    embed_on_host: bool = False,
) -> tuple[MixtralModel, MoepackFile]:
    """The model (KV cache for `ctx` positions, default min(max_position_embeddings, 4096))
    and the open file. `expert_backend_factory(file, model, device, dtype)` defaults to
    ResidentExperts; `dequantize_at_load` keeps quantized attention / lm_head weights dense;
    `cuda_graphs` (None: on CUDA with triton) makes one-token steps replay CUDA graphs
    (runtime.step_graph, runtime.decode_graphs); `fuse_qkv` stacks each layer's q, k and v
    projections into one where their layouts allow (Attention.fuse_qkv); `embed_on_host` keeps
    the embedding table in host RAM (MixtralModel.embed_tokens; not with tied embeddings,
    whose matrix the lm_head needs on the device)."""
    file = path_or_file if isinstance(path_or_file, MoepackFile) else MoepackFile(path_or_file)
    cfg, device = file.config, torch.device(device)
    if device.type == "cuda":
        # this GPU's tuned launch configs, before any kernel plan (or captured graph) picks one
        from .kernels.tuning import ensure_loaded

        ensure_loaded(device)

    def raw(name: str, on: torch.device = device) -> torch.Tensor:
        t = file.header.tensor(name)
        if verify_tensors:
            file.verify_tensor(t)
        return host_tensor(file.tensor_bytes(name)).to(on)

    def dense(name: str, on: torch.device = device) -> torch.Tensor:
        t = file.header.tensor(name)
        return dequantize(component_tensors(raw(name, on), t.shape, t.spec), t.shape, t.spec, dtype)

    def linear(name: str):
        t = file.header.tensor(name)
        return make_linear(raw(name), t.shape, t.spec, dtype, dequantize_at_load)

    layers = []
    for L in range(cfg.num_hidden_layers):
        p = f"model.layers.{L}."
        attn = Attention(
            L, linear(p + "self_attn.q_proj.weight"), linear(p + "self_attn.k_proj.weight"),
            linear(p + "self_attn.v_proj.weight"), linear(p + "self_attn.o_proj.weight"), rotary=None,
            num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
            sliding_window=cfg.sliding_window,
        )
        if fuse_qkv:
            attn.fuse_qkv()
        layers.append(DecoderLayer(
            RMSNorm(dense(p + "input_layernorm.weight"), cfg.rms_norm_eps), attn,
            RMSNorm(dense(p + "post_attention_layernorm.weight"), cfg.rms_norm_eps),
            MoEBlock(L, dense(p + "block_sparse_moe.gate.weight"), cfg.num_experts_per_tok),
        ))
    if cfg.tie_word_embeddings:
        # one matrix for both, never packed (the embedding gathers rows): dense, or on the CPU a
        # large fp16 one kept fp16 (qlinear.HalfLinear), whose rows the embedding widens, bit
        # for bit what a dense copy would hold
        t = file.header.tensor("model.embed_tokens.weight")
        lm_head = make_linear(raw("model.embed_tokens.weight"), t.shape, t.spec, dtype, dequantize_at_load=True)
        embed = lm_head.weight16 if isinstance(lm_head, HalfLinear) else lm_head.weight
        embed_on_host = False
    else:
        embed = dense("model.embed_tokens.weight", torch.device("cpu") if embed_on_host else device)
        lm_head = linear("lm_head.weight")
    model = MixtralModel(
        cfg, embed, layers, RMSNorm(dense("model.norm.weight"), cfg.rms_norm_eps), lm_head,
        ctx if ctx is not None else default_ctx(file), device, dtype, embed_on_host=embed_on_host,
    )
    model.use_decode_graphs = graphs_supported(device) if cuda_graphs is None else cuda_graphs
    # the CPU kernel's default rounding (int8 on a CPU-only model): before the backend, whose
    # hybrid engine times the kernel and asks for int16 (runtime.cpu_native.set_auto_activations)
    set_auto_activations(device.type == "cpu")
    model.experts = (expert_backend_factory or resident_experts)(file, model, device, dtype)
    return model, file
