"""Mixtral (batch 1) over weights from a .moepack file: embeddings, decoder layers of
attention + sparse MoE, final norm and lm_head. Where experts live is the business of the
expert backend alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from formats.errors import ConfigError
from formats.header import ModelConfig

from .attention import Attention
from .cpu_native import set_auto_activations
from .cpu_step import CpuStep, cpu_step_refusal
from .decode_graphs import DecodeGraphs
from .device import to_device
from .experts import ExpertBackend
from .kv_cache import KVCache
from .moe import MoEBlock
from .rmsnorm import RMSNorm
from .rope import Rotary
from .step_graph import StepGraph, step_graph_applies


class DecoderLayer(nn.Module):
    def __init__(self, input_norm: RMSNorm, attn: Attention, post_attn_norm: RMSNorm, moe: MoEBlock):
        super().__init__()
        self.input_norm, self.attn, self.post_attn_norm, self.moe = input_norm, attn, post_attn_norm, moe

    def forward(self, h: torch.Tensor, start_pos: int, cache: KVCache, experts: ExpertBackend) -> torch.Tensor:
        # h: [T, H], the residual stream
        h = h + self.attn(self.input_norm(h), start_pos, cache)
        return h + self.moe(self.post_attn_norm(h), experts)


class MixtralModel(nn.Module):
    def __init__(self, config: ModelConfig, embed: torch.Tensor, layers: list[DecoderLayer], norm: RMSNorm,
                 lm_head: nn.Module, max_ctx: int, device: torch.device, dtype: torch.dtype,
                 embed_on_host: bool = False):
        super().__init__()
        self.config, self.device, self.dtype = config, torch.device(device), dtype
        self.embed = nn.Parameter(embed, requires_grad=False)  # [V, H]
        # the table stays in host RAM and only the looked-up rows cross the link (offloading:
        # a Mixtral-8x7B table is 262 MB of GPU memory, ~5 expert slots), as llama.cpp does
        self.embed_on_host = embed_on_host
        self.layers = nn.ModuleList(layers)
        self.norm, self.lm_head = norm, lm_head
        self.experts: ExpertBackend | None = None
        self.cache: KVCache | None = None
        # one-token steps replay one CUDA graph (runtime.step_graph) when the expert backend
        # routes on the device, else a graph per layer (runtime.decode_graphs); the loader
        # turns this on for CUDA
        self.use_decode_graphs = False
        self.decode_graphs: DecodeGraphs | None = None
        self.step_graph: StepGraph | None = None
        # one-token CPU steps in one C call (runtime.cpu_step), decided per expert backend:
        # (the backend, its CpuStep or None where it does not apply)
        self.cpu_step: tuple[ExpertBackend, CpuStep | None] | None = None
        # which path the latest one-token step took ("cpu step", "step graph", "layer graphs",
        # "torch"; None before any): generate's statistics say it, since each is several times
        # faster than the next where it applies
        self.decode_path: str | None = None
        self.allocate_context(max_ctx)

    @property
    def max_ctx(self) -> int:
        return self.cache.max_ctx

    def allocate_context(self, max_ctx: int) -> None:
        """(Re)allocate the KV cache and rotary tables for `max_ctx` positions."""
        cfg = self.config
        if not 1 <= max_ctx <= cfg.max_position_embeddings:
            raise ConfigError(
                f"context length {max_ctx} must be in [1, {cfg.max_position_embeddings}] (max_position_embeddings)",
                hint="choose a smaller --ctx",
            )
        self.cache = None  # free the old cache before allocating the new one
        self.decode_graphs = None  # captured over the old cache and rotary tables
        self.step_graph = None
        self.cpu_step = None  # holds the old cache's and rotary tables' addresses
        self.cache = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, max_ctx, self.device, self.dtype)
        rotary = Rotary(cfg.head_dim, cfg.rope_theta, max_ctx, self.device, self.dtype)
        for layer in self.layers:
            layer.attn.rotary = rotary

    def _decode_step(self, h: torch.Tensor, start_pos: int) -> torch.Tensor:
        """All layers for one token: the dense part of each by graph replay, the experts by the
        backend in between (it needs the routing decision on the host)."""
        # h: [1, H]
        if self.decode_graphs is None:
            self.decode_graphs = DecodeGraphs(self)
        g = self.decode_graphs
        g.begin(h, start_pos)
        for i, layer in enumerate(self.layers):
            h_mid, x, topk_idx, topk_w = g.layer(i)
            y = self.experts.forward(layer.moe.layer, x, topk_idx, topk_w)  # [1, H]
            torch.add(h_mid, y, out=g.h)  # the residual stream, in place: the next layer's input
        return g.h

    def _cpu_step(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor | None:
        """The logits of a one-token step by runtime.cpu_step, or None where it does not apply
        or declines this token (the torch path runs instead)."""
        if self.cpu_step is None or self.cpu_step[0] is not self.experts:
            from .cpu_expert import _native

            kernel = _native()
            self.cpu_step = (self.experts, CpuStep(self, kernel) if cpu_step_refusal(self, kernel) is None else None)
        step = self.cpu_step[1]
        return None if step is None else step.step(tokens, start_pos)

    def cpu_step_phases(self) -> dict[str, float] | None:
        """Milliseconds per C decode step in each phase (runtime.cpu_step.PHASES) since the
        last reset_cpu_step_phases(); None where one-token steps do not run in C."""
        step = self.cpu_step[1] if self.cpu_step is not None else None
        return None if step is None else step.phase_ms()

    def reset_cpu_step_phases(self) -> None:
        if self.cpu_step is not None and self.cpu_step[1] is not None:
            self.cpu_step[1].reset_times()

    def use_torch_step(self) -> None:
        """One-token CPU steps run in torch from now on (for this expert backend): the torch
        step the C one replaces, for comparisons."""
        self.cpu_step = (self.experts, None)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [T] -> [T, H] in the compute dtype on the device (the table may be kept fp16)."""
        if not self.embed_on_host:
            return F.embedding(tokens.to(self.device), self.embed).to(self.dtype)
        # a token on the device costs one small sync here; the offloading engine syncs on every
        # layer's routing anyway
        return to_device(F.embedding(tokens.cpu(), self.embed), self.device, self.dtype)  # [T, H]

    def router_weights(self, layer: int) -> torch.Tensor:
        """The router of `layer`: [E, H] in the compute dtype (for speculative prefetch)."""
        return self.layers[layer].moe.router

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int, last_only: bool = False) -> torch.Tensor:
        """tokens: [T] int64 at positions start_pos .. start_pos + T - 1 (the KV cache must
        hold positions 0 .. start_pos - 1). Returns float32 logits [T, V] ([1, V] if last_only)."""
        if self.experts is None:
            raise ConfigError("the model has no expert backend", hint="build it with runtime.loader.load_model")
        # the CPU kernel's auto rounding is one per process: this model's, whatever was loaded last
        set_auto_activations(self.device.type == "cpu" and not getattr(self.experts, "exact_cpu_experts", False))
        T = tokens.shape[0]
        if T < 1 or start_pos < 0 or start_pos + T > self.max_ctx:
            raise ConfigError(
                f"positions {start_pos}..{start_pos + T - 1} do not fit the allocated context of {self.max_ctx} tokens",
                hint="allocate a longer context (--ctx) or shorten the prompt",
            )
        if T == 1 and self.use_decode_graphs and step_graph_applies(self):
            if self.step_graph is None or self.step_graph.experts is not self.experts:  # captured over these
                self.step_graph = StepGraph(self)
            self.decode_path = "step graph"
            return self.step_graph.step(tokens, start_pos)  # [1, V]
        if T == 1 and self.device.type == "cpu" and not self.use_decode_graphs:  # (graphs on the CPU: their tests)
            logits = self._cpu_step(tokens, start_pos)
            if logits is not None:
                self.decode_path = "cpu step"
                return logits  # [1, V]
        h = self.embed_tokens(tokens)  # [T, H]
        if T == 1 and self.use_decode_graphs:
            self.decode_path = "layer graphs"
            h = self._decode_step(h, start_pos)
        else:
            if T == 1:
                self.decode_path = "torch"
            for layer in self.layers:
                h = layer(h, start_pos, self.cache, self.experts)
        if last_only:
            h = h[-1:]
        return self.lm_head(self.norm(h)).float()  # [T, V]
