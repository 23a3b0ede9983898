"""The importance matrix measured on the checkpoint itself: `moe-pack imatrix SRC TEXT`, where
SRC is the Hugging Face folder (or Hub repo id) that `moe-pack quantize` reads.

quantize/imatrix.py measures by running a .moepack file of the checkpoint. For Mixtral-8x7B
that asks for a first 4/4 quantize (~25 GB written, an hour of HQQ) and a machine that holds
the file's model; here the checkpoint's own float weights run instead, one decoder layer at a
time over every calibration token, as GPTQ and AWQ calibrate:
- the hidden states of all windows stay in memory between layers, and a layer holds a few more
  such arrays (the norm's output, attention's, the residual): [tokens, H] float32, 128 MB each
  for 8192 tokens of Mixtral-8x7B;
- each layer's tensors are read from the shards when the layer runs and dropped after it, and an
  expert is read only if some token routes to it: at most one expert's three matrices in float32
  (0.7 GB for Mixtral-8x7B) and the layer's attention are held at once, on the CPU or the GPU;
- the arithmetic is transformers' MixtralForCausalLM in float32 (tests/quantize/
  test_imatrix_checkpoint.py holds the two equal), so the importances are those of the
  unquantized model the file approximates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Generator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from formats.errors import MoepackError
from formats.header import ModelConfig, TokenizerInfo

from .imatrix import ATTENTION_INPUTS, Imatrix, _Sums, text_sha256, text_windows
from .tensors import ExpertItem, TensorItem, expert_matrix_name, load, plan_records

# Routed rows per expert matmul: the [rows, intermediate] float32 temporaries of one chunk stay
# ~230 MB for Mixtral-8x7B whatever the number of calibration tokens
EXPERT_ROWS = 4096
# An expert's w2 inputs ([rows, I] float32) are kept from its w2 step to its output step while
# rows <= HELD_MID_ROWS * H, i.e. while they are no larger than w1 and w3 together: held
# instead of those, they cost no memory and save w1 and w3's matmuls a second time
HELD_MID_ROWS = 2


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


def layer_steps(cfg: ModelConfig, w: Weights, layer: int, h: torch.Tensor, spans: list[tuple[int, int]], sums
                ) -> Generator[tuple[str, ...], None, torch.Tensor]:
    """One decoder layer over h [N, H] (the windows one after another), as steps in the order the
    file stores the layer's matrices: each step passes the input rows of some matrices to
    sums.add(names, x) and yields those names; the next step reads them from `w` only then.
    Its return value is the layer's output [N, H].

    Unrouted experts yield their names too, with no rows: every quantized matrix of the layer
    is named once, in file order. `moe-pack quantize --gptq` advances the steps as the writer
    stores each matrix, so every matrix's inputs come through the matrices before it as stored
    (GPTQ's sequential order); run_layer runs them through at once."""
    from runtime.attention import attention_mask
    from runtime.moe import route
    from runtime.rope import Rotary

    p = f"model.layers.{layer}."
    attn = tuple(p + f"self_attn.{m}.weight" for m in ATTENTION_INPUTS)
    o_name = p + "self_attn.o_proj.weight"
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    x = _rms_norm(h, w.get(p + "input_layernorm.weight"), cfg.rms_norm_eps)  # [N, H]
    sums.add(attn, x)
    yield attn
    wq, wk, wv = (w.get(name) for name in attn)
    rotary = Rotary(hd, cfg.rope_theta, max(n for _, n in spans), h.device, torch.float32)
    a = torch.empty(h.shape[0], nh * hd, dtype=h.dtype, device=h.device)  # attention's output, o's input
    for start, n in spans:
        xw = x[start:start + n]  # [T, H]
        q = rotary((xw @ wq.T).view(n, nh, hd), 0).transpose(0, 1)  # [nh, T, hd]
        k = rotary((xw @ wk.T).view(n, nkv, hd), 0).transpose(0, 1)  # [nkv, T, hd]
        v = (xw @ wv.T).view(n, nkv, hd).transpose(0, 1)
        k, v = k.repeat_interleave(nh // nkv, dim=0), v.repeat_interleave(nh // nkv, dim=0)
        mask = attention_mask(n, 0, cfg.sliding_window, h.device)  # [T, T]; windows have >= 2 tokens
        a[start:start + n] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(0, 1).reshape(n, nh * hd)
    del x, wq, wk, wv
    sums.add((o_name,), a)
    yield (o_name,)
    h = h + a @ w.get(o_name).T
    del a

    x = _rms_norm(h, w.get(p + "post_attention_layernorm.weight"), cfg.rms_norm_eps)  # [N, H]
    idx, weights = route(x, w.get(p + "block_sparse_moe.gate.weight"), cfg.num_experts_per_tok)  # [N, k] each
    out = h.clone()
    for e in range(cfg.num_local_experts):
        up, down = (expert_matrix_name(layer, e, "w1"), expert_matrix_name(layer, e, "w3")), expert_matrix_name(layer, e, "w2")
        rows, slot = (idx == e).nonzero(as_tuple=True)  # tokens routed to e, and where in their top-k
        chunks = [(rows[i:i + EXPERT_ROWS], slot[i:i + EXPERT_ROWS]) for i in range(0, rows.numel(), EXPERT_ROWS)]
        for r, _ in chunks:
            sums.add(up, x[r])
        yield up
        if not chunks:  # never read: no rows, no entry, and quantize fits it with equal weights
            yield (down,)
            continue
        w1, w3 = w.expert(layer, e, "w1"), w.expert(layer, e, "w3")

        def mid(r: torch.Tensor) -> torch.Tensor:  # w2's input for rows r: [n, I]
            xr = x[r]  # [n, H]
            return F.silu(xr @ w1.T) * (xr @ w3.T)

        # w2's inputs are held over the step while they take no more memory than w1 and w3,
        # which are dropped instead; past that (many calibration tokens) they are made again
        mids = [mid(r) for r, _ in chunks] if rows.numel() <= HELD_MID_ROWS * cfg.hidden_size else None
        for i, (r, _) in enumerate(chunks):
            sums.add((down,), mid(r) if mids is None else mids[i])
        if mids is not None:
            del w1, w3
        yield (down,)
        w2 = w.expert(layer, e, "w2")
        for i, (r, s) in enumerate(chunks):
            out.index_add_(0, r, ((mid(r) if mids is None else mids[i]) @ w2.T) * weights[r, s, None])
        del w2, mids
    return out


def head_steps(cfg: ModelConfig, w: Weights, h: torch.Tensor, sums) -> Generator[tuple[str, ...], None, None]:
    """After the last layer: lm_head's input, the final norm of its output h [N, H], as one step."""
    sums.add(("lm_head.weight",), _rms_norm(h, w.get("model.norm.weight"), cfg.rms_norm_eps))
    yield ("lm_head.weight",)


def measure_checkpoint(src: str, text: str, *, ctx: int = 512, max_tokens: int | None = 8192, device: str = "auto",
                       revision: str | None = None, progress: bool = True, download=None) -> Imatrix:
    """The importance matrix of checkpoint SRC's own weights over `text`, in windows of `ctx`
    tokens, one decoder layer at a time."""
    from runtime.device import resolve_device

    from .calibrate import check_window_options
    from .source import open_checkpoint

    check_window_options(ctx, max_tokens, least=2)
    dev = resolve_device(device)
    windows: list[list[int]] = []

    def before_weights(config: ModelConfig, tokenizer) -> None:  # a useless text fails before a download
        windows.extend(checkpoint_windows(config, tokenizer, text, ctx, max_tokens, src))

    ckpt = open_checkpoint(src, revision=revision, download=download, check=before_weights)
    w = Weights(ckpt.folder, plan_records(ckpt.folder, ckpt.config), dev)  # every name, dtype and shape checked here
    sums = _Sums()
    try:
        h, spans = first_hidden(w, windows)
        with torch.inference_mode():
            for layer in tqdm(range(ckpt.config.num_hidden_layers), unit="layer", desc="imatrix", disable=not progress):
                h = run_layer(ckpt.config, w, layer, h, spans, sums)
    except torch.OutOfMemoryError:
        raise MoepackError(f"out of GPU memory measuring {src}",
                           hint="use fewer tokens (--max-tokens), or --device cpu") from None
    # a local folder by its name, as a .moepack file is: where it lies is no part of the result
    model = Path(src).name if Path(src).is_dir() else src
    return Imatrix(entries=sums.means(), tokens=h.shape[0], text_sha256=text_sha256(text), model=model)


def checkpoint_windows(config: ModelConfig, tokenizer: TokenizerInfo, text: str, ctx: int, max_tokens: int | None,
                       source: str) -> list[list[int]]:
    """The calibration text's first `max_tokens` ids in windows (text_windows) of at most `ctx`
    tokens; from the checkpoint's metadata alone, so it can run before the weights are fetched."""
    from .calibrate import text_ids

    return text_windows(*text_ids(tokenizer, config, text, ctx, max_tokens, source))


def first_hidden(w: Weights, windows: list[list[int]]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The windows one after another as embeddings h [N, H] float32 on w's device, and each
    window's (start, length) in h."""
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
    steps = layer_steps(cfg, w, layer, h, spans, sums)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
