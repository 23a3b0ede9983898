"""`python -m runtime.generate model.moepack --prompt "..."`: text generation from a .moepack file.

Generated text streams to stdout as it is produced. After each generation one stats line
goes to stderr (prompt and new tokens, prefill and decode speed, load time, peak GPU
memory or peak RSS, expert backend statistics); with --json that line is one JSON object
instead, so stdout carries nothing but the generated text either way. Without --prompt the
command reads prompts from stdin, one per line, until EOF or an empty line; with --chat
the conversation accumulates over those prompts.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time

import click
import torch
from tqdm import tqdm

from formats.errors import ConfigError, MoepackError
from formats.reader import MoepackFile

from .cli import cpu_activations_option, run_command
from .cpu_native import cpu_activations_in_use
from .device import peak_memory, resolve_device, resolve_dtype
from .experts import resident_experts
from .generation import GenerationStats, Session
from .loader import default_ctx, load_model
from .offload.options import OffloadOptions, make_backend_factory, offload_options, preflight
from .sampling import Sampler, SamplingConfig
from .tokenizer import StopFilter, StreamDecoder, TextTokenizer


def parse_ids(text: str, vocab: int) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"--prompt-ids {text!r} is not a list of integers", hint='write e.g. --prompt-ids "1,415,2936"') from None
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ConfigError(f"--prompt-ids: token id {bad[0]} is outside the vocabulary [0, {vocab})")
    return ids


def stats_record(stats: GenerationStats, load_s: float, device: torch.device, dtype: torch.dtype, backend: dict,
                 decode_path: str | None = None) -> dict:
    kind, peak = peak_memory(device)
    return {**stats.to_json(), "load_s": round(load_s, 3), "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "decode_path": decode_path, "peak_memory": {"kind": kind, "bytes": peak}, "backend": backend}


def stats_line(r: dict) -> str:
    mem = r["peak_memory"]
    backend = " ".join(f"{k}={v}" for k, v in r["backend"].items())
    return (
        f"stats: prompt {r['prompt_tokens']} tok, new {r['new_tokens']} tok (stop: {r['stop']}), "
        f"prefill {r['prefill_s']:.3f} s ({r['prefill_tok_s']:.1f} tok/s), decode {r['decode_tok_s']:.2f} tok/s"
        + (f" ({r['decode_path']})" if r.get("decode_path") else "") + ", "
        f"load {r['load_s']:.2f} s, peak {'GPU memory' if mem['kind'] == 'gpu' else 'RSS'} {mem['bytes'] / 2**20:.1f} MiB"
        + (f", {backend}" if backend else "")
    )


class Runner:
    """One loaded model and the state of a (possibly interactive) run."""

    def __init__(self, model, tokenizer: TextTokenizer | None, sampling: SamplingConfig, opts: dict, load_s: float):
        self.model, self.tokenizer, self.opts, self.load_s = model, tokenizer, opts, load_s
        self.sampler = Sampler(sampling)
        self.session = Session(model)
        self.messages: list[dict] = [{"role": "system", "content": opts["system"]}] if opts["system"] else []
        self.eos = tuple(tokenizer.eos_ids) if tokenizer else ()

    def prompt_ids(self, text: str) -> list[int]:
        if self.opts["chat"]:
            self.messages.append({"role": "user", "content": text})
            return self.tokenizer.encode_chat(self.messages)
        return self.tokenizer.encode(text)

    def run(self, ids: list[int]) -> None:
        out = sys.stdout
        decoder = StreamDecoder(self.tokenizer) if self.tokenizer else None
        stops = StopFilter(self.opts["stop"])
        printed: list[str] = []

        def write(text: str) -> None:
            printed.append(text)
            out.write(text)
            out.flush()

        def on_token(t: int) -> bool:
            if t in self.eos:
                return False
            write(stops.push(decoder.push(t)) if decoder else f"{t} ")
            return stops.stopped

        if not self.opts["chat"]:
            self.session.cached = []  # each prompt is a fresh generation
        self.model.experts.reset_stats()
        self.model.reset_cpu_step_phases()
        new, stats = self.session.generate(ids, self.sampler, self.opts["max_new_tokens"], self.eos, on_token)
        if decoder and not stops.stopped:
            write(stops.push(decoder.flush()) + stops.flush())
        shown = "".join(printed)
        write("\n")
        if self.opts["chat"]:
            # the conversation goes on from what was shown: cut at a stop string
            reply = shown if stops.stopped else self.tokenizer.decode([t for t in new if t not in self.eos])
            self.messages.append({"role": "assistant", "content": reply})
        record = stats_record(stats, self.load_s, self.model.device, self.model.dtype, self.model.experts.stats(),
                              self.model.decode_path)
        record["cpu_step_ms"] = self.model.cpu_step_phases()  # where a C step's time went; None without one
        record["cpu_activations"] = cpu_activations_in_use(load=False)  # the CPU kernel's rounding; None: it never ran
        click.echo(json.dumps(record) if self.opts["json"] else stats_line(record), err=True)


DENSE_CPU_LIMIT = 256 << 20  # bytes of dense attention / lm_head weights the CPU default accepts


def dense_on_cpu(file: MoepackFile, device: torch.device, dtype: torch.dtype) -> bool:
    """The default of --dequantize-at-load: on the CPU, dense weights while they are small (a
    dense matmul then beats any per-call kernel, and memory is no issue); above DENSE_CPU_LIMIT
    they stay packed and decode reads a quarter of the bytes through runtime.cpu_expert's
    kernels (Mixtral-8x7B's 4-bit attention: 0.7 GB per token instead of 5.4 GB in float32).
    Without a CPU kernel, dense. The GPU keeps them packed (fused kernels)."""
    if device.type != "cpu":
        return False
    from .cpu_expert import cpu_expert_available

    size = torch.tensor([], dtype=dtype).element_size()
    dense = sum(math.prod(t.shape) * size for t in file.header.tensors if t.spec.quantized)
    return dense <= DENSE_CPU_LIMIT or not cpu_expert_available()


def load(path: str, device_name: str, dtype_name: str, ctx: int | None, verify: bool, dequantize_at_load: bool | None,
         offload: OffloadOptions = OffloadOptions(), cuda_graphs: bool = True):
    t0 = time.perf_counter()
    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name, device)
    file = MoepackFile(path)
    if ctx is None:
        ctx = default_ctx(file)
    if not 1 <= ctx <= file.config.max_position_embeddings:
        raise ConfigError(f"--ctx {ctx} must be in [1, {file.config.max_position_embeddings}] (the model's max_position_embeddings)")
    if dequantize_at_load is None:
        dequantize_at_load = dense_on_cpu(file, device, dtype)
    # the memory plan is checked before any byte is loaded, so a too-small budget fails fast
    plan = preflight(file, offload, device, dtype, ctx, dequantize_at_load)
    graphs = None if cuda_graphs else False  # None: on wherever they can run (CUDA with triton)
    if plan is not None:
        factory = make_backend_factory(offload, ctx=ctx, cuda_graphs=graphs)
    else:
        factory = functools.partial(resident_experts, cuda_graphs=graphs)
    if verify:
        with tqdm(total=file.size - file.data_offset, unit="B", unit_scale=True, desc="verifying", file=sys.stderr, disable=None) as bar:
            file.verify(bar.update)
    model, _ = load_model(file, device, dtype, factory, ctx=ctx, dequantize_at_load=dequantize_at_load,
                          cuda_graphs=graphs, embed_on_host=plan is not None and plan.embed_on_host)
    return model, file, time.perf_counter() - t0


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, help=__doc__)
@click.argument("model_path", metavar="MODEL.moepack")
@click.option("-p", "--prompt", help="Prompt text; without it prompts are read from stdin, one per line.")
@click.option("--prompt-ids", help="Prompt as token ids (\"1,415,2936\"), for files without a tokenizer.")
@click.option("-n", "--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy decoding.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 disables the top-k cut.")
@click.option("--min-p", type=float, default=0.0, show_default=True,
              help="Drop tokens below this share of the best token's probability (0 disables; 0.05 is common).")
@click.option("--repetition-penalty", "--repeat-penalty", "repetition_penalty", type=float, default=1.0, show_default=True,
              help="Divide the positive logits (multiply the negative) of tokens already in the context, as "
                   "transformers does; 1 disables it, 1.1-1.3 discourage loops.")
@click.option("--seed", type=int, default=None, help="Seed of the sampler (default: random).")
@click.option("--stop", "stop", multiple=True, metavar="TEXT",
              help="End the generation where the text shows this string (not printed); repeatable.")
@click.option("--chat", is_flag=True, help="Wrap prompts in the file's chat template; interactive turns accumulate.")
@click.option("--system", help="System prompt (with --chat).")
@click.option("--device", "device_name", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", "dtype_name", default="auto", show_default=True, help="auto, float32, float16 or bfloat16.")
@click.option("--ctx", type=int, default=None, help="Context length to allocate [default: min(max_position_embeddings, 4096)].")
@click.option("--verify", is_flag=True, help="Check every record's crc32 before running (non-expert tensors are always checked).")
@click.option("--json", "as_json", is_flag=True, help="Print the stats line on stderr as one JSON object.")
@click.option("--threads", type=int, default=None,
              help="CPU threads for torch (default: torch's choice; 1 is fastest for tiny models on a busy machine).")
@click.option("--dequantize-at-load/--no-dequantize-at-load", default=None,
              help="Keep quantized attention/lm_head weights dense [default: off for CUDA; on the CPU, on while they are under 256 MiB dense].")
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
              help="One-token steps replay captured CUDA graphs (each layer's dense part, each expert); CUDA only.")
@offload_options
@cpu_activations_option
def cli(model_path, prompt, prompt_ids, max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop,
        chat, system, device_name, dtype_name, ctx, verify, as_json, threads, dequantize_at_load, cuda_graphs, **offload):
    sampling = SamplingConfig(temperature, top_k, top_p, seed, min_p=min_p, repetition_penalty=repetition_penalty)
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads {threads} must be at least 1")
        torch.set_num_threads(threads)
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    if prompt is not None and prompt_ids is not None:
        raise ConfigError("give --prompt or --prompt-ids, not both")
    if chat and prompt_ids is not None:
        raise ConfigError("--chat needs a text prompt, not --prompt-ids")
    if system is not None and not chat:
        raise ConfigError("--system only applies with --chat")
    if "" in stop:
        raise ConfigError("--stop needs a non-empty string", hint='e.g. --stop "User:"')
    model, file, load_s = load(model_path, device_name, dtype_name, ctx, verify, dequantize_at_load,
                               OffloadOptions.from_cli(**offload), cuda_graphs)
    tokenizer = None
    if file.header.tokenizer.tokenizer_json is not None:
        tokenizer = TextTokenizer(file.header.tokenizer, str(file.path))
    elif prompt_ids is None:
        TextTokenizer(file.header.tokenizer, str(file.path))  # raises the "no tokenizer" error
    if stop and tokenizer is None:
        raise ConfigError(f"--stop needs text, but {file.path} has no tokenizer", hint="run without --stop")
    if chat and not tokenizer.has_chat_template:
        raise MoepackError(f"{file.path} has no chat template", hint="run without --chat")
    opts = {"chat": chat, "system": system, "max_new_tokens": max_new_tokens, "json": as_json, "stop": stop}
    runner = Runner(model, tokenizer, sampling, opts, load_s)
    if prompt_ids is not None:
        runner.run(parse_ids(prompt_ids, file.config.vocab_size))
    elif prompt is not None:
        runner.run(runner.prompt_ids(prompt))
    else:
        interactive = sys.stdin.isatty()
        while True:
            if interactive:
                click.echo("> ", nl=False, err=True)
            line = sys.stdin.readline()
            if not line.strip():
                break
            runner.run(runner.prompt_ids(line.rstrip("\n")))


def main(argv: list[str] | None = None) -> int:
    return run_command(cli, "python -m runtime.generate", argv)


if __name__ == "__main__":
    sys.exit(main())
