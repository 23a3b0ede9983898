"""`moe-pack calibrate FILE TEXT`: run the file's own model over a calibration text, count how
often each expert of each layer is chosen, and store the counts in the file's header
(`expert_counts`, FORMAT.md). The runtime keeps the most used experts in host RAM when RAM is
short and places them first on the GPU; `moe-pack inspect` shows them.

The counts come from the quantized model itself (its routers are fp16, untouched by
quantization, but their inputs pass through quantized layers), which is the model the runtime
will route with."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from tqdm.auto import tqdm

from formats.errors import ConfigError
from formats.header import ModelConfig, TokenizerInfo
from formats.reader import MoepackFile
from formats.writer import rewrite_header


class CountingExperts:
    """An expert backend that counts each layer's routing choices, then delegates."""

    def __init__(self, inner, n_layers: int, n_experts: int):
        self.inner = inner
        self.counts = torch.zeros(n_layers, n_experts, dtype=torch.int64)

    def forward(self, layer: int, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        # topk_idx: [T, k]
        self.counts[layer] += torch.bincount(topk_idx.flatten().cpu(), minlength=self.counts.shape[1])
        return self.inner.forward(layer, x, topk_idx, topk_w)

    def stats(self) -> dict:
        return self.inner.stats()

    def reset_stats(self) -> None:
        self.inner.reset_stats()


def check_window_options(ctx: int, max_tokens: int | None, least: int, options=("--ctx", "--max-tokens")) -> None:
    """--ctx and --max-tokens (named `options`) are each at least `least` tokens."""
    what = "positive" if least == 1 else f"at least {least}"
    if ctx < least:
        raise ConfigError(f"{options[0]} {ctx} must be {what}", hint="512 tokens per window is the default")
    if max_tokens is not None and max_tokens < least:
        raise ConfigError(f"{options[1]} {max_tokens} must be {what}", hint="8192 tokens is the default")


def text_ids(tokenizer: TokenizerInfo, config: ModelConfig, text: str, ctx: int, max_tokens: int | None,
             source: str):
    """(a TextTokenizer of `tokenizer`, the first max_tokens ids of `text` without BOS, ctx
    capped at the model's context): from a model's metadata alone, a file's or a checkpoint's."""
    from runtime.tokenizer import TextTokenizer

    tok = TextTokenizer(tokenizer, source=source)
    ids = tok.encode(text, add_bos=False)
    return tok, ids if max_tokens is None else ids[:max_tokens], min(ctx, config.max_position_embeddings)


def open_text(path: Path, text: str, ctx: int, max_tokens: int | None, least: int):
    """(the open file, then text_ids of its model), after the checks that --ctx and
    --max-tokens are at least `least` (calibrate and imatrix)."""
    check_window_options(ctx, max_tokens, least)
    file = MoepackFile(path)
    return (file, *text_ids(file.header.tokenizer, file.config, text, ctx, max_tokens, str(path)))


def count_experts(path: Path, text: str, *, ctx: int = 512, max_tokens: int | None = 8192, device: str = "auto",
                  dtype: str = "auto", progress: bool = True) -> tuple[tuple[tuple[int, ...], ...], int]:
    """(counts [layers][experts], tokens routed): the text in windows of `ctx` tokens."""
    from runtime.device import resolve_device, resolve_dtype
    from runtime.loader import load_model

    file, tok, ids, ctx = open_text(path, text, ctx, max_tokens, least=1)
    cfg = file.config
    if not ids:
        raise ConfigError("the calibration text has no tokens", hint="pass a file with some text in it")
    dev = resolve_device(device)
    model, _ = load_model(file, dev, resolve_dtype(dtype, dev), ctx=ctx, dequantize_at_load=True)
    counter = CountingExperts(model.experts, cfg.num_hidden_layers, cfg.num_local_experts)
    model.experts = counter
    with torch.no_grad(), tqdm(total=len(ids), unit="tok", desc="calibrating", disable=not progress) as bar:
        for start in range(0, len(ids), ctx):
            window = torch.tensor(ids[start:start + ctx], dtype=torch.long)
            model(window, 0, last_only=True)  # every position is routed; only the last row's logits are made
            bar.update(len(window))
    file.close()
    return tuple(tuple(int(v) for v in row) for row in counter.counts.tolist()), len(ids)


def calibrate(path: Path, text: str, **kwargs) -> tuple[tuple[tuple[int, ...], ...], int]:
    """Count the experts over `text` and write the counts into the header of `path` (atomically)."""
    counts, n = count_experts(path, text, **kwargs)
    with MoepackFile(path) as f:
        header = dataclasses.replace(f.header, expert_counts=counts)
    rewrite_header(path, header)
    return counts, n
