"""Baseline decode speed with every expert resident on the compute device:
`python -m runtime.baseline_bench [--layers 2] [--tiny] [--recipe fp16 --recipe 4/2]`.

Builds a synthetic .moepack (random packed bytes, runtime.offload.synthfile) with Mixtral-8x7B
layer shapes but only a few layers, loads it with the default ResidentExperts backend and
times prefill and greedy decoding. Prints one JSON object per recipe on stdout. Per-token
time scales with the number of layers plus a fixed part (embedding, final norm, lm_head,
sampling), so `ms_per_layer` over-counts that fixed part: extrapolate to 32 layers with care.
--tiny uses a tiny shape so the script runs in seconds on a CPU (the tests use it). On the CPU
a row says whether decode ran the C step (runtime.cpu_step) and, if so, the decode speed of the
torch step it replaces (`decode_tok_s_torch_step`, a second decode of the same prompt), and the
C step's milliseconds per token by phase (`cpu_step_ms`: attention's GEMVs, attention itself,
routing, the experts, the head), measured inside its loop.
"""

from __future__ import annotations

import functools
import gc
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import click
import torch

from formats.errors import MoepackError
from formats.header import ModelConfig, Recipe
from formats.qtensor import QuantSpec

from .bench import decode
from .cpu_native import cpu_activations_in_use
from .cli import cpu_activations_option, run_command
from .device import cuda_memory_breakdown, peak_memory, resolve_device, resolve_dtype, synchronize
from .experts import resident_experts
from .loader import load_model
from .offload.synthfile import write_bench_file

FP16 = QuantSpec(16)


def bench_recipe(name: str) -> Recipe:
    attention = QuantSpec(4, 64, 8, 256)
    experts = {"4/2": QuantSpec(2, 16, 8, 128), "4/3": QuantSpec(3, 64, 8, 128)}  # the paper's recipes, 8-bit meta
    experts |= {f"{k}m4": replace(v, meta_bits=4) for k, v in experts.items()}  # 4-bit meta codes (format version 2)
    if name == "fp16":
        attention = expert = FP16
    elif name in experts:
        expert = experts[name]
    else:
        raise MoepackError(f"--recipe {name!r} is not one of fp16, {', '.join(experts)}")
    return Recipe({"embeddings": FP16, "attention": attention, "norms": FP16, "router": FP16,
                   "experts": expert, "lm_head": FP16})


def bench_config(layers: int, tiny: bool) -> ModelConfig:
    if tiny:
        shape = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, num_local_experts=4)
    else:  # Mixtral-8x7B
        shape = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, num_local_experts=8)
    return ModelConfig(num_hidden_layers=layers, num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6,
                       max_position_embeddings=32768, **shape)


# --cuda-graphs mode -> (graphs, device routing): off, eager with the host reading each layer's
# router choice; layers, a graph per layer and per expert (the host still reads the choice);
# step, the whole step as one graph with the experts found on the device (runtime.step_graph);
# on, graphs with the best routing the backend offers
GRAPH_MODES = {"off": (False, False), "layers": (True, False), "step": (True, True), "on": (True, None)}
GRAPH_CHOICES = {"off": ["off"], "on": ["on"], "layers": ["layers"], "step": ["step"], "both": ["off", "on"],
                 "all": ["off", "layers", "step"]}


def graph_modes(choices: list[str] | str) -> list[str]:
    """--cuda-graphs values (each a mode or an alias: both, all) -> the modes, in order, once each."""
    out: dict[str, None] = {}
    for c in [choices] if isinstance(choices, str) else choices:
        out.update(dict.fromkeys(GRAPH_CHOICES[c]))
    return list(out)


def run_one(path: Path, device: torch.device, dtype: torch.dtype, prompt_len: int, new_tokens: int, warmup: int,
            graphs: str = "off") -> dict:
    # the previous run's model sits in reference cycles (its graphs and C step hold it), so only
    # a collection frees its weights and graph pools before this run's peak is counted
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    cuda_graphs, routing = GRAPH_MODES[graphs]
    t0 = time.perf_counter()
    factory = functools.partial(resident_experts, cuda_graphs=cuda_graphs, device_routing=routing)
    model, file = load_model(path, device, dtype, ctx=prompt_len + warmup + new_tokens + 1, cuda_graphs=cuda_graphs,
                             expert_backend_factory=factory)
    synchronize(device)
    load_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, file.config.vocab_size, (prompt_len,), generator=gen).to(device)
    model(prompt, 0, last_only=True)  # warm-up prefill (allocator, kernels), then the timed one
    synchronize(device)
    t0 = time.perf_counter()
    model(prompt, 0, last_only=True)
    synchronize(device)
    prefill_s = time.perf_counter() - t0
    decode_s, _ = decode(model, prompt, new_tokens, warmup)
    kind, peak = peak_memory(device)
    layers = file.config.num_hidden_layers
    backend = model.experts.stats()
    cpu = {}
    if device.type == "cpu":  # which decode step ran (runtime.cpu_step), and the torch one beside it
        cpu["cpu_step"] = model.decode_path == "cpu step"
        cpu["cpu_activations"] = cpu_activations_in_use()
        if cpu["cpu_step"]:
            cpu["cpu_step_ms"] = model.cpu_step_phases()  # the timed decode's steps, by phase
            model.use_torch_step()
            torch_s, _ = decode(model, prompt, new_tokens, warmup)
            cpu["decode_tok_s_torch_step"] = round(new_tokens / torch_s, 3)
    return {
        "layers": layers, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "file_bytes": path.stat().st_size, "load_s": round(load_s, 3),
        "prefill_tokens": prompt_len, "prefill_tok_s": round(prompt_len / prefill_s, 2),
        "decode_tokens": new_tokens, "decode_tok_s": round(new_tokens / decode_s, 3),
        "ms_per_token": round(1e3 * decode_s / new_tokens, 3),
        "ms_per_layer": round(1e3 * decode_s / new_tokens / layers, 3),
        "peak_memory": {"kind": kind, "bytes": peak}, "gpu_memory": cuda_memory_breakdown(device),
        "backend": backend, **cpu,
    }


def run_bench(recipes: list[str], layers: int = 2, tiny: bool = False, device: str = "auto", dtype: str = "auto",
              prompt_len: int = 16, new_tokens: int = 32, warmup: int = 3, workdir: Path | None = None,
              graphs: list[str] | str = "both") -> Iterator[dict]:
    """One result dict per recipe and graph mode (see the module docstring), each as soon as it
    is measured: a run cut short by a time limit keeps the rows it finished."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    cfg = bench_config(layers, tiny)
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)  # a fresh folder is fine: the files are temporary
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for name in recipes:
            path = Path(tmp) / f"bench-{name.replace('/', '-')}.moepack"
            t0 = time.perf_counter()
            write_bench_file(path, cfg, bench_recipe(name), seed=0, progress=not tiny)
            build_s = time.perf_counter() - t0
            modes = graph_modes(graphs) if dev.type == "cuda" else ["off"]
            for g in modes:
                r = run_one(path, dev, dt, prompt_len, new_tokens, warmup, graphs=g)
                yield {"recipe": name, "tiny": tiny, "build_s": round(build_s, 1), "cuda_graphs": g, **r}
            path.unlink()


def _check_recipes(ctx, param, names):
    # at parse time, so a misspelt recipe fails before any file is written
    for name in names:
        try:
            bench_recipe(name)
        except MoepackError as e:
            raise click.BadParameter(e.message.removeprefix("--recipe ")) from None
    return names


@click.command(help=__doc__)
@click.option("--layers", type=click.IntRange(1, 32), default=2, show_default=True)
@click.option("--tiny", is_flag=True, help="Tiny shapes instead of Mixtral-8x7B's.")
@click.option("--recipe", "recipes", multiple=True, default=("fp16", "4/2"), show_default=True, callback=_check_recipes, help="fp16, 4/2, 4/3, 4/2m4 or 4/3m4 (m4: the experts' scale/zero as 4-bit codes).")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--prompt-len", type=click.IntRange(1), default=16, show_default=True)
@click.option("--new-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write the temporary synthetic file (default: the system temp folder).")
@click.option("--cuda-graphs", "graphs", type=click.Choice(list(GRAPH_CHOICES)), multiple=True, default=("both",),
              show_default=True,
              help="CUDA only, repeatable. off: eager, the host reads each layer's routing; layers: a graph per "
                   "layer and per expert; step: the whole step as one graph, experts chosen on the device; on: the "
                   "best the backend offers; both: off and on; all: off, layers and step.")
@cpu_activations_option
def cli(layers, tiny, recipes, device, dtype, prompt_len, new_tokens, workdir, graphs):
    for r in run_bench(list(recipes), layers, tiny, device, dtype, prompt_len, new_tokens, workdir=workdir,
                       graphs=list(graphs)):
        print(json.dumps(r), flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_command(cli, "python -m runtime.baseline_bench", argv)


if __name__ == "__main__":
    sys.exit(main())
