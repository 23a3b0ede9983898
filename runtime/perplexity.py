"""Perplexity of a .moepack model on a text file, over fixed windows.

    python -m runtime.perplexity model.moepack text.txt [--ctx 512] [--stride N] [--max-tokens N] [--json]

Windows. The text is tokenized once, whole, with the tokenizer stored in the file (no BOS
inside it), optionally cut to its first --max-tokens tokens, then cut into windows of
`ctx` positions that start every `stride` tokens. Each window is an independent forward
pass from position 0 (a fresh context, as transformers would see it).
- If the header says add_bos_token, every window is BOS + ctx-1 text tokens; BOS is context
  only, never scored, and every text token of the window is scored (the first one from BOS).
- Otherwise a window is ctx text tokens and its first token is context only: with the
  default stride (no overlap) that token is never scored. Use --stride < ctx to score it.
- Overlapping windows (stride < span) score only the tokens no earlier window scored, each
  with the longest context its window offers (the usual sliding-window evaluation).
The last window may be shorter than the others. perplexity = exp(mean NLL over scored tokens).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import click
import torch
from tqdm.auto import tqdm

from formats.errors import ConfigError, MoepackError

from .cli import cpu_activations_option

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # ids [T] int64 -> logits [T, V]


@dataclass(frozen=True)
class Window:
    """Text tokens [begin, end) go through the model; tokens [score_from, end) are scored."""

    begin: int
    end: int
    score_from: int


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # summed negative log-likelihood (nats) of the scored tokens
    tokens_scored: int
    tokens_total: int  # text tokens evaluated (after --max-tokens)
    windows: int
    ctx: int
    stride: int
    bos: bool
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def plan_windows(n_tokens: int, ctx: int, stride: int | None = None, bos: bool = False) -> list[Window]:
    """The windows over `n_tokens` text tokens (module docstring). Windows that would score
    nothing are left out."""
    span = ctx - int(bos)  # text tokens per window
    if span < 1 or ctx < 2:
        raise ConfigError(f"--ctx {ctx} is too small", hint="use a context of at least 2 tokens")
    stride = span if stride is None else stride
    if not 1 <= stride <= span:
        raise ConfigError(
            f"--stride {stride} must be in [1, {span}] (the text tokens of one window)",
            hint="a larger stride would skip tokens; leave --stride out for non-overlapping windows",
        )
    windows, scored_to, begin = [], 0, 0
    while True:
        end = min(begin + span, n_tokens)
        # a window's first token has nothing to be predicted from unless BOS precedes it
        first = max(scored_to, begin if bos else begin + 1)
        if first < end:
            windows.append(Window(begin, end, first))
            scored_to = end
        if end >= n_tokens:
            return windows
        begin += stride


def window_nll(logits: torch.Tensor, ids: torch.Tensor, w: Window, bos: bool) -> float:
    """Summed NLL of tokens [w.score_from, w.end) from one window's logits [T, V] (float64 sum)."""
    off = int(bos) - w.begin  # text token j sits at window position j + off
    rows = slice(w.score_from + off - 1, w.end + off - 1)  # position p predicts the token at p + 1
    logp = torch.log_softmax(logits[rows].float(), dim=-1)  # [S, V]
    target = ids[w.score_from : w.end].to(logp.device)  # [S]
    return -float(logp.gather(1, target[:, None]).double().sum())


def evaluate(
    logits_fn: LogitsFn,
    token_ids: Sequence[int] | torch.Tensor,
    ctx: int,
    stride: int | None = None,
    *,
    bos_token_id: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of `logits_fn` (window ids [T] -> logits [T, V]) over `token_ids` (no BOS);
    BOS prefixes every window when `bos_token_id` is given."""
    ids = torch.as_tensor(token_ids, dtype=torch.int64).reshape(-1)  # [N]
    bos = bos_token_id is not None
    windows = plan_windows(ids.numel(), ctx, stride, bos)
    if not windows:
        raise ConfigError(
            f"{ids.numel()} token(s) leave nothing to score",
            hint="give a longer text (at least 2 tokens, or 1 with a BOS token)",
        )
    prefix = torch.tensor([bos_token_id] if bos else [], dtype=torch.int64)
    nll, scored = 0.0, 0
    start = time.perf_counter()
    bar = tqdm(windows, desc="perplexity", unit="win", disable=not progress, dynamic_ncols=True)
    for w in bar:
        logits = logits_fn(torch.cat([prefix, ids[w.begin : w.end]]))  # [T, V]
        nll += window_nll(logits, ids, w, bos)
        scored += w.end - w.score_from
        bar.set_postfix_str(f"ppl {math.exp(nll / scored):.3f}", refresh=False)
    bar.close()
    return PerplexityResult(
        perplexity=math.exp(nll / scored), nll=nll, tokens_scored=scored, tokens_total=int(ids.numel()),
        windows=len(windows), ctx=ctx, stride=stride if stride is not None else ctx - int(bos), bos=bos,
        seconds=time.perf_counter() - start,
    )


def model_logits_fn(model) -> LogitsFn:
    """A runtime MixtralModel as a LogitsFn: each window is a fresh pass from position 0
    (the KV cache is overwritten, never read past what this window wrote)."""
    if model.max_ctx < 2:
        raise ConfigError(f"the model's allocated context ({model.max_ctx}) is too small for perplexity")
    return lambda ids: model.forward(ids, 0)


def perplexity(model, token_ids, ctx: int, stride: int | None = None, *, bos_token_id: int | None = None,
               progress: bool = False) -> tuple[float, int]:
    """(perplexity, tokens scored) of a runtime model or of any LogitsFn (ids [T] -> logits [T, V])."""
    if ctx > getattr(model, "max_ctx", ctx):
        raise ConfigError(
            f"--ctx {ctx} is larger than the model's allocated context ({model.max_ctx})",
            hint="load the model with ctx >= the perplexity window",
        )
    fn = model_logits_fn(model) if hasattr(model, "max_ctx") else model
    r = evaluate(fn, token_ids, ctx, stride, bos_token_id=bos_token_id, progress=progress)
    return r.perplexity, r.tokens_scored


def read_text(path: Path) -> str:
    """The text file's contents; one-line errors for what cannot be used."""
    if not path.exists():
        raise MoepackError(f"{path}: no such text file", hint="pass an existing UTF-8 text file")
    if not path.is_file():
        raise MoepackError(f"{path}: not a regular file", hint="pass a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MoepackError(f"{path}: not UTF-8 text (bad byte at offset {e.start})", hint="convert the file to UTF-8") from None
    if not text.strip():
        raise MoepackError(f"{path}: the text is empty", hint="pass a file with some text in it")
    return text


def run(model_path: Path, text_path: Path, ctx: int, stride: int | None, max_tokens: int | None,
        device: str, dtype: str, progress: bool = True) -> dict:
    """The CLI's work, returned as the --json object."""
    from formats.reader import MoepackFile

    from .device import resolve_device, resolve_dtype
    from .loader import load_model
    from .tokenizer import TextTokenizer

    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"--max-tokens {max_tokens} must be positive")
    text = read_text(text_path)
    file = MoepackFile(model_path)
    limit = file.config.max_position_embeddings
    if ctx > limit:
        raise ConfigError(
            f"--ctx {ctx} is larger than the model's context ({limit} positions, max_position_embeddings)",
            hint=f"use --ctx {limit} or less",
        )
    tok = TextTokenizer(file.header.tokenizer, source=str(model_path))
    bos_id = tok.bos_id if file.header.tokenizer.add_bos_token else None
    ids = tok.encode(text, add_bos=False)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    plan_windows(len(ids), ctx, stride, bos_id is not None)  # option errors before the (slow) model load
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model, _ = load_model(file, dev, dt, ctx=ctx, dequantize_at_load=True)
    r = evaluate(model_logits_fn(model), ids, ctx, stride, bos_token_id=bos_id, progress=progress)
    return {"file": str(model_path), "text": str(text_path), **r.to_json(), "device": str(dev), "dtype": str(dt).removeprefix("torch.")}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("text", type=click.Path(path_type=Path))
@click.option("--ctx", default=512, show_default=True, help="positions per window (BOS included when the model adds one)")
@click.option("--stride", type=int, default=None, help="tokens between window starts [default: no overlap]")
@click.option("--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the text")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--dtype", default="auto", show_default=True, help="auto (float32 on CPU, float16 on CUDA), float32, float16, bfloat16")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of text")
@cpu_activations_option
def main(model, text, ctx, stride, max_tokens, device, dtype, as_json) -> None:
    """Perplexity of MODEL (.moepack) on the UTF-8 text file TEXT."""
    try:
        out = run(model, text, ctx, stride, max_tokens, device, dtype)
    except MoepackError as e:
        click.echo(f"error: {e.message}", err=True)
        if e.hint:
            click.echo(f"hint: {e.hint}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(
        f"perplexity {out['perplexity']:.4f} over {out['tokens_scored']} tokens "
        f"({out['windows']} windows of {out['ctx']}, stride {out['stride']}, BOS {'yes' if out['bos'] else 'no'}) "
        f"in {out['seconds']:.1f} s on {out['device']} ({out['dtype']})"
    )


if __name__ == "__main__":
    main()
