"""`python -m runtime.generate` end to end on the tiny files."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.generate import main

ROOT = Path(__file__).resolve().parents[2]


def run(capsys, *args, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles):
    assert rc == 1
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and all(n in lines[0] for n in needles), err
    assert len(lines) <= 2 and (len(lines) == 1 or lines[1].startswith("hint: ")), err
    assert "Traceback" not in err


def test_prompt_streams_text_and_stats(capsys, file42):
    from runtime.generation import Session
    from runtime.loader import load_model
    from runtime.sampling import Sampler, SamplingConfig
    from runtime.tokenizer import TextTokenizer

    rc, out, err = run(capsys, file42, "--prompt", "The quick brown fox", "--max-new-tokens", 12, "--device", "cpu")
    assert rc == 0
    stats = err.strip().splitlines()[-1]
    assert stats.startswith("stats: prompt ") and "decode" in stats and "peak RSS" in stats and "expert_evals=" in stats
    # greedy by default: stdout is exactly the decoding of the greedy continuation
    model, file = load_model(file42, torch.device("cpu"), torch.float32, ctx=64)
    tok = TextTokenizer(file.header.tokenizer)
    new, st = Session(model).generate(tok.encode("The quick brown fox"), Sampler(SamplingConfig()), 12, tok.eos_ids)
    assert out == tok.decode([t for t in new if t not in tok.eos_ids]) + "\n"
    assert f"prompt {st.prompt_tokens} tok, new {len(new)} tok" in stats


def test_stop_strings_cut_the_text(capsys, file42):
    args = ("--prompt", "The quick brown fox", "-n", 24, "--device", "cpu")
    rc, full, _ = run(capsys, file42, *args)
    text = full[:-1]
    assert rc == 0 and len(text) >= 12, full
    stop = text[len(text) // 2: len(text) // 2 + 3]
    rc, out, err = run(capsys, file42, *args, "--stop", "never there", "--stop", stop, "--json")
    assert rc == 0 and out == text[:text.index(stop)] + "\n"
    r = json.loads(err.strip().splitlines()[-1])
    assert r["stop"] == "stop_string" and r["new_tokens"] < 24


def test_a_chat_goes_on_from_the_text_a_stop_string_cut(capsys, file42, monkeypatch):
    from formats import MoepackFile
    from runtime.tokenizer import TextTokenizer

    rc, first, _ = run(capsys, file42, "--chat", "-n", 16, stdin="hello\n", monkeypatch=monkeypatch)
    reply = first[:-1]
    assert rc == 0 and len(reply) >= 8, first
    stop = reply[len(reply) // 2: len(reply) // 2 + 2]
    cut = reply[:reply.index(stop)]
    rc, out, err = run(capsys, file42, "--chat", "-n", 16, "--json", "--stop", stop, stdin="hello\nand more\n",
                       monkeypatch=monkeypatch)
    turns = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert rc == 0 and out.startswith(cut + "\n") and turns[0]["stop"] == "stop_string"
    tok = TextTokenizer(MoepackFile(file42).header.tokenizer)
    expected = tok.encode_chat([{"role": "user", "content": "hello"}, {"role": "assistant", "content": cut},
                                {"role": "user", "content": "and more"}])
    assert turns[1]["prompt_tokens"] == len(expected)


def test_json_stats(capsys, file42):
    rc, out, err = run(capsys, file42, "-p", "hello", "-n", 5, "--json", "--temperature", "0.7", "--top-p", "0.9",
                       "--top-k", "20", "--min-p", "0.05", "--repetition-penalty", "1.2", "--seed", "3")
    assert rc == 0
    r = json.loads(err.strip().splitlines()[-1])
    assert 1 <= r["new_tokens"] <= 5 and r["prompt_tokens"] == r["prefill_tokens"] > 1 and r["device"] == "cpu" and r["dtype"] == "float32"
    assert r["peak_memory"]["kind"] == "rss" and r["peak_memory"]["bytes"] > 0
    assert r["backend"]["backend"] == "resident" and r["load_s"] >= 0 and r["decode_tok_s"] >= 0
    # the seed reproduces a sampled run
    assert run(capsys, file42, "-p", "hello", "-n", 5, "--temperature", "0.7", "--seed", "3")[1] == \
        run(capsys, file42, "-p", "hello", "-n", 5, "--temperature", "0.7", "--seed", "3")[1]


def test_chat_uses_the_template(capsys, file42):
    rc, out, err = run(capsys, file42, "-p", "hi", "--chat", "--system", "be brief", "-n", 4, "--json")
    assert rc == 0
    from formats import MoepackFile
    from runtime.tokenizer import TextTokenizer

    tok = TextTokenizer(MoepackFile(file42).header.tokenizer)
    expected = tok.encode_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert json.loads(err.strip().splitlines()[-1])["prompt_tokens"] == len(expected) > len(tok.encode("hi"))


def test_interactive_chat_accumulates(capsys, file42, monkeypatch):
    rc, out, err = run(capsys, file42, "--chat", "-n", 3, "--json", stdin="hello\nand more\n\nignored\n", monkeypatch=monkeypatch)
    assert rc == 0
    turns = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert len(turns) == 2  # the empty line ends the session
    assert turns[1]["prompt_tokens"] > turns[0]["prompt_tokens"] + turns[0]["new_tokens"]
    # the second turn extends the first conversation: only its new part is prefilled
    assert turns[1]["prefill_tokens"] < turns[1]["prompt_tokens"]
    assert len(out.splitlines()) == 2


def test_interactive_plain_prompts_are_independent(capsys, file42, monkeypatch):
    rc, out, err = run(capsys, file42, "-n", 4, stdin="one two\none two\n", monkeypatch=monkeypatch)
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0] == lines[1]


def test_prompt_ids_without_tokenizer(capsys, no_tokenizer_file):
    rc, out, err = run(capsys, no_tokenizer_file, "--prompt-ids", "1,5,9", "-n", 4)
    assert rc == 0 and len(out.split()) == 4 and all(t.isdigit() for t in out.split())
    rc, out, err = run(capsys, no_tokenizer_file, "-p", "text")
    assert_one_line_error(rc, err, "no tokenizer")


def test_verify(capsys, file42, tmp_path):
    assert run(capsys, file42, "-p", "hi", "-n", 2, "--verify")[0] == 0
    bad = tmp_path / "bad.moepack"
    data = bytearray(file42.read_bytes())
    data[-10] ^= 0xFF  # inside the last record
    bad.write_bytes(bytes(data))
    rc, _, err = run(capsys, bad, "-p", "hi", "-n", 2, "--verify")
    assert_one_line_error(rc, err, "crc32")


def test_corrupt_expert_is_caught_only_by_verify(capsys, file42, tmp_path):
    from formats import MoepackFile

    f = MoepackFile(file42)
    pos = f.data_offset + f.header.expert(0, 0).offset + 5
    bad = tmp_path / "bad-expert.moepack"
    data = bytearray(file42.read_bytes())
    data[pos] ^= 0xFF
    bad.write_bytes(bytes(data))
    assert run(capsys, bad, "-p", "hi", "-n", 2)[0] == 0  # experts are not checked without --verify
    rc, _, err = run(capsys, bad, "-p", "hi", "-n", 2, "--verify")
    assert_one_line_error(rc, err, "expert 0.0", "crc32")


@pytest.mark.parametrize("args, needles", [
    (["-p", "hi", "--temperature", "-1"], ["--temperature"]),
    (["-p", "hi", "--top-p", "0"], ["--top-p"]),
    (["-p", "hi", "--top-p", "1.5"], ["--top-p"]),
    (["-p", "hi", "--top-k", "-2"], ["--top-k"]),
    (["-p", "hi", "--min-p", "1.5"], ["--min-p"]),
    (["-p", "hi", "--repeat-penalty", "0"], ["--repetition-penalty"]),
    (["-p", "hi", "-n", "0"], ["--max-new-tokens"]),
    (["-p", "hi", "--ctx", "0"], ["--ctx"]),
    (["-p", "hi", "--threads", "0"], ["--threads"]),
    (["-p", "hi", "--ctx", "100000"], ["--ctx", "max_position_embeddings"]),
    (["-p", "hi", "--dtype", "int8"], ["--dtype"]),
    (["-p", "hi", "--device", "tpu"], ["--device"]),
    (["-p", "hi", "--temperature", "warm"], ["--temperature"]),
    (["-p", "hi", "--no-such-option"], ["--no-such-option"]),
    (["-p", "hi", "--system", "x"], ["--system"]),
    (["-p", "hi", "--stop", ""], ["--stop"]),
    (["-p", "the quick brown fox jumps over the lazy dog", "--ctx", "4"], ["prompt has", "context holds 4"]),
    (["--prompt-ids", "1,x"], ["--prompt-ids"]),
    (["--prompt-ids", "1,99999"], ["outside the vocabulary"]),
])
def test_bad_options_are_one_line_errors(capsys, file42, args, needles):
    rc, _, err = run(capsys, file42, *args)
    assert_one_line_error(rc, err, *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(capsys, file42):
    rc, _, err = run(capsys, file42, "-p", "hi", "--device", "cuda")
    assert_one_line_error(rc, err, "CUDA is not available")


def test_bad_files(capsys, tmp_path, file42):
    rc, _, err = run(capsys, tmp_path / "missing.moepack", "-p", "hi")
    assert_one_line_error(rc, err, "no such file")
    junk = tmp_path / "junk.moepack"
    junk.write_bytes(b"not a model at all" * 10)
    rc, _, err = run(capsys, junk, "-p", "hi")
    assert_one_line_error(rc, err, "junk.moepack", "magic")
    cut = tmp_path / "cut.moepack"
    cut.write_bytes(file42.read_bytes()[:-4096])
    rc, _, err = run(capsys, cut, "-p", "hi")
    assert_one_line_error(rc, err, "cut.moepack")


def test_chat_without_template(capsys, tmp_path, tiny_checkpoint):
    import dataclasses

    from tests.runtime.packing_helpers import RECIPE_4_2, checkpoint_tokenizer, write_moepack

    info = dataclasses.replace(checkpoint_tokenizer(tiny_checkpoint), chat_template=None)
    path = write_moepack(tiny_checkpoint, tmp_path / "nochat.moepack", RECIPE_4_2, tokenizer=info)
    rc, _, err = run(capsys, path, "-p", "hi", "--chat")
    assert_one_line_error(rc, err, "no chat template")
    assert run(capsys, path, "-p", "hi", "-n", 2)[0] == 0


def test_module_entry_point_streams(file42):
    """The real `python -m runtime.generate` in a subprocess: text on stdout as it comes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.generate", str(file42), "-p", "The quick", "-n", "60", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env,
    )
    first = os.read(proc.stdout.fileno(), 1)
    running = proc.poll() is None  # text arrives while tokens are still being generated
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    stats = err.decode().strip().splitlines()[-1]
    assert stats.startswith("stats: ") and "new 60 tok" in stats
    assert first and running
    assert len((first + out).decode("utf-8", "replace")) > 20
    bad = subprocess.run([sys.executable, "-m", "runtime.generate", str(file42), "-p", "x", "--top-p", "2"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert bad.returncode == 1 and bad.stderr.startswith("error: --top-p") and "Traceback" not in bad.stderr
