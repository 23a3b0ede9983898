"""The importance matrix measured on the checkpoint itself: `moe-pack imatrix SRC TEXT`, where
SRC is the Hugging Face folder (or Hub repo id) that `moe-pack quantize` reads.

quantize/imatrix.py measures by running a .moepack file of the checkpoint. For Mixtral-8x7B
that asks for a first 4/4 quantize (~25 GB written, an hour of HQQ) and a machine that holds
the file's model; here the checkpoint's own float weights run instead, one decoder layer at a
time over every calibration token, as GPTQ and AWQ calibrate:
- the hidden states of all windows stay in memory between layers ([tokens, H] float32: 128 MB
  for 8192 tokens of Mixtral-8x7B);
- each layer's tensors are read from the shards when the layer runs and dropped after it, and an
  expert is read only if some token routes to it: at most one expert's three matrices in float32
  (0.7 GB for Mixtral-8x7B) and the layer's attention are held at once, on the CPU or the GPU;
- the arithmetic is transformers' MixtralForCausalLM in float32 (tests/quantize/
  test_imatrix_checkpoint.py holds the two equal), so the importances are those of the
  unquantized model the file approximates.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from formats.errors import MoepackError
from formats.header import ModelConfig

from .imatrix import ATTENTION_INPUTS, Imatrix, _Sums, text_sha256, text_windows
from .tensors import ExpertItem, TensorItem, expert_matrix_name, load, plan_records

# Routed rows per expert matmul: the [rows, intermediate] float32 temporaries of one chunk stay
# ~230 MB for Mixtral-8x7B whatever the number of calibration tokens
EXPERT_ROWS = 4096


class Weights:
    """The checkpoint's tensors by .moepack name, read one at a time as float32 on `dev`."""

    def __init__(self, folder: Path, plan: list, dev: torch.device):
        self.folder, self.dev = folder, dev
        self.tensors = {it.name: it.ref for it in plan if isinstance(it, TensorItem)}
        self.experts = {(it.layer, it.expert): dict(it.refs) for it in plan if isinstance(it, ExpertItem)}

    def get(self, name: str) -> torch.Tensor:
        return load(self.folder, self.tensors[name]).to(self.dev, torch.float32)

    def expert(self, layer: int, e: int, matrix: str) -> torch.Tensor:
        return load(self.folder, self.experts[(layer, e)][matrix]).to(self.dev, torch.float32)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [T, H]
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _attention(cfg: ModelConfig, w: Weights, layer: int, h: torch.Tensor, spans: list[tuple[int, int]],
               sums) -> torch.Tensor:
    """h [N, H] (the windows one after another) -> h after the layer's attention and residual."""
    from runtime.attention import attention_mask
    from runtime.rope import Rotary

    p = f"model.layers.{layer}."
    norm = w.get(p + "input_layernorm.weight")
    wq, wk, wv, wo = (w.get(p + f"self_attn.{m}.weight") for m in ("q_proj", "k_proj", "v_proj", "o_proj"))
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rotary = Rotary(hd, cfg.rope_theta, max(n for _, n in spans), h.device, torch.float32)
    out = torch.empty_like(h)
    for start, n in spans:
        x = _rms_norm(h[start:start + n], norm, cfg.rms_norm_eps)  # [T, H]
        sums.add(tuple(p + f"self_attn.{m}.weight" for m in ATTENTION_INPUTS), x)
        q = rotary((x @ wq.T).view(n, nh, hd), 0).transpose(0, 1)  # [nh, T, hd]
        k = rotary((x @ wk.T).view(n, nkv, hd), 0).transpose(0, 1)  # [nkv, T, hd]
        v = (x @ wv.T).view(n, nkv, hd).transpose(0, 1)
        k, v = k.repeat_interleave(nh // nkv, dim=0), v.repeat_interleave(nh // nkv, dim=0)
        mask = attention_mask(n, 0, cfg.sliding_window, h.device)  # [T, T]; windows have >= 2 tokens
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(0, 1).reshape(n, nh * hd)
        sums.add((p + "self_attn.o_proj.weight",), a)
        out[start:start + n] = h[start:start + n] + a @ wo.T
    return out


def _experts(cfg: ModelConfig, w: Weights, layer: int, h: torch.Tensor, sums) -> torch.Tensor:
    """h [N, H] -> h after the layer's sparse MoE block and residual."""
    from runtime.moe import route

    p = f"model.layers.{layer}."
    x = _rms_norm(h, w.get(p + "post_attention_layernorm.weight"), cfg.rms_norm_eps)  # [N, H]
    idx, weights = route(x, w.get(p + "block_sparse_moe.gate.weight"), cfg.num_experts_per_tok)  # [N, k] each
    out = h.clone()
    for e in range(cfg.num_local_experts):
        rows, slot = (idx == e).nonzero(as_tuple=True)  # tokens routed to e, and where in their top-k
        if rows.numel() == 0:
            continue  # never read: no rows, no entry, and quantize fits it with equal weights
        w1, w3, w2 = (w.expert(layer, e, m) for m in ("w1", "w3", "w2"))
        for i in range(0, rows.numel(), EXPERT_ROWS):
            r, s = rows[i:i + EXPERT_ROWS], slot[i:i + EXPERT_ROWS]
            xr = x[r]  # [n, H]
            sums.add((expert_matrix_name(layer, e, "w1"), expert_matrix_name(layer, e, "w3")), xr)
            mid = F.silu(xr @ w1.T) * (xr @ w3.T)  # [n, I]
            sums.add((expert_matrix_name(layer, e, "w2"),), mid)
            out.index_add_(0, r, (mid @ w2.T) * weights[r, s, None])
        del w1, w3, w2
    return out


def measure_checkpoint(src: str, text: str, *, ctx: int = 512, max_tokens: int | None = 8192, device: str = "auto",
                       revision: str | None = None, progress: bool = True, download=None) -> Imatrix:
    """The importance matrix of checkpoint SRC's own weights over `text`, in windows of `ctx`
    tokens, one decoder layer at a time."""
    from runtime.device import resolve_device

    from .calibrate import check_window_options
    from .source import open_checkpoint

    check_window_options(ctx, max_tokens, least=2)
    ckpt = open_checkpoint(src, revision=revision, download=download)
    dev = resolve_device(device)
    w = Weights(ckpt.folder, plan_records(ckpt.folder, ckpt.config), dev)  # every name, dtype and shape checked here
    sums = _Sums()
    try:
        h, spans = first_hidden(ckpt, w, text, ctx, max_tokens, src)
        with torch.inference_mode():
            for layer in tqdm(range(ckpt.config.num_hidden_layers), unit="layer", desc="imatrix", disable=not progress):
                h = run_layer(ckpt.config, w, layer, h, spans, sums)
    except torch.OutOfMemoryError:
        raise MoepackError(f"out of GPU memory measuring {src}",
                           hint="use fewer tokens (--max-tokens), or --device cpu") from None
    # a local folder by its name, as a .moepack file is: where it lies is no part of the result
    model = Path(src).name if Path(src).is_dir() else src
    return Imatrix(entries=sums.means(), tokens=h.shape[0], text_sha256=text_sha256(text), model=model)


def first_hidden(ckpt, w: Weights, text: str, ctx: int, max_tokens: int | None, source: str
                 ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The calibration text's windows (text_windows) one after another as embeddings h [N, H]
    float32 on w's device, and each window's (start, length) in h."""
    from runtime.tokenizer import TextTokenizer

    tok = TextTokenizer(ckpt.tokenizer, source=source)
    ids = tok.encode(text, add_bos=False)
    windows = text_windows(tok, ids if max_tokens is None else ids[:max_tokens],
                           min(ctx, ckpt.config.max_position_embeddings))
    spans, start = [], 0
    for win in windows:
        spans.append((start, len(win)))
        start += len(win)
    flat = torch.tensor([i for win in windows for i in win], dtype=torch.long)
    embed = load(w.folder, w.tensors["model.embed_tokens.weight"])  # [V, H], on the host: rows only move
    return embed[flat].to(w.dev, torch.float32), spans


def run_layer(cfg: ModelConfig, w: Weights, layer: int, h: torch.Tensor, spans: list[tuple[int, int]],
              sums) -> torch.Tensor:
    """h [N, H] -> the decoder layer's output; every matrix's input rows go to sums.add(names, x)."""
    h = _attention(cfg, w, layer, h, spans, sums)
    return _experts(cfg, w, layer, h, sums)
