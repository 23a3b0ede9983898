"""Offloading benchmark: `python -m runtime.bench [--gpu-memory 12GiB] [--routing trace|model|all]
[--variant naive|lru|prefetch|hybrid|hybrid-only|hybrid-w2|all ...] [--expert-bits 2|3] [--expert-meta-bits 8|4] [--tiny] [--json FILE] [--write-md docs/BENCHMARKS.md]`.

Builds (once, cached in --cache-dir) a synthetic .moepack file with real Mixtral-8x7B shapes
(runtime.offload.synthfile), loads the non-expert weights on the device, fills the host
arena once, and times greedy decoding with the offloading engine for every combination of
GPU budget x routing x variant:

\b
  naive     every layer loads the experts it needs on every token (no cache, no prefetch)
  lru       the expert cache in the budget (--cache-policy: per-layer LRU by default, or lfu)
  prefetch  LRU + speculative prefetch of the next layer's experts
  hybrid    prefetch, and each decode step computes some of its missed experts on the CPU from
            host RAM (whole, or split: the CPU takes part of w1/w3 while w2 and the GPU's rows
            are copied) while the others are copied (runtime.offload.hybrid); not part of "all"
  hybrid-only   hybrid without prefetch
  hybrid-w2     hybrid-only, and while a layer computes, the w2 of the next layer's likely
                miss is copied ahead into a spare split scratch set (--prefetch-w2)

Routing `model` uses the model's own (random) routers, meant as the worst case for a cache
(on a random-weight model they turn out to repeat from token to token). Routing `trace` replaces each layer's choice by a synthetic trace calibrated to real
Mixtral-8x7B routing (runtime.offload.traces), the prefetcher's guess being right with
probability --guess-accuracy per expert. The transfer bound is the calibrated pinned
host->device bandwidth divided by the bytes copied per token. --simulate prints the cache
policies' trace-driven hit rates without running a model.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import click
import torch

from formats.errors import ConfigError, MoepackError
from formats.header import ModelConfig, Recipe
from formats.qtensor import QuantSpec
from formats.reader import MoepackFile

from .cli import cpu_activations_option, run_command
from .cpu_native import cpu_activations_in_use
from .device import cuda_memory_breakdown, resolve_device, resolve_dtype, synchronize
from .loader import load_model
from .offload.budget import POLICIES, format_size, parse_size, plan_memory
from .offload.cache import make_cache
from .offload.engine import OffloadedExperts
from .offload.host import HostStore, plan_host
from .offload.options import CUDA_RESERVE, embeds_on_host, fused_kernels, hybrid_scratch_bytes, model_bytes
from .offload.schedule import CacheStats, Planner, simulate
from .offload.synthfile import write_bench_file
from .offload.traces import SyntheticRouting, reference_params, trace_steps

FP16 = QuantSpec(16)
VARIANTS = ("naive", "lru", "prefetch")
# not in "all": missed experts computed (or split) on the CPU when that is faster; "hybrid" with
# whole-expert prefetch, "hybrid-only" without, "hybrid-w2" staging the next layer's likely miss's w2
EXTRA_VARIANTS = ("hybrid", "hybrid-only", "hybrid-w2")
EXPERT_SPECS = {2: QuantSpec(2, 16, 8, 128), 3: QuantSpec(3, 64, 8, 128)}


def bench_config(layers: int, tiny: bool) -> ModelConfig:
    if tiny:
        shape = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16)
    else:  # Mixtral-8x7B
        shape = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128)
    return ModelConfig(num_hidden_layers=layers, num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5,
                       rope_theta=1e6, max_position_embeddings=32768, **shape)


def bench_recipe(expert_bits: int, expert_meta_bits: int = 8) -> Recipe:
    """The reference paper's recipe: attention 4-bit g64, experts 2-bit g16 (or 3-bit g64), 8-bit
    meta; experts with 4-bit meta codes (format version 2) if asked."""
    experts = replace(EXPERT_SPECS[expert_bits], meta_bits=expert_meta_bits)
    return Recipe({"embeddings": FP16, "attention": QuantSpec(4, 64, 8, 256), "norms": FP16, "router": FP16,
                   "experts": experts, "lm_head": FP16})


def bench_file(cache_dir: Path, layers: int, tiny: bool, expert_bits: int, seed: int,
               expert_meta_bits: int = 8) -> MoepackFile:
    """The cached synthetic file for this configuration, written on first use."""
    meta = "" if expert_meta_bits == 8 else f"m{expert_meta_bits}"
    name = f"{'tiny' if tiny else 'mixtral-8x7b'}-L{layers}-a4-e{expert_bits}{meta}-s{seed}.moepack"
    path = Path(cache_dir).expanduser() / name
    if path.exists():
        try:
            return MoepackFile(path)
        except MoepackError:
            path.unlink()  # a stale or damaged cache entry: write it again
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = bench_config(layers, tiny)
    params = reference_params(layers, cfg.num_local_experts)
    counts = tuple(tuple(int(round(v * 119_000)) for v in row) for row in params.popularity)  # ~59.5k tokens x top-2
    t0 = time.perf_counter()
    write_bench_file(path, cfg, bench_recipe(expert_bits, expert_meta_bits), seed=seed, expert_counts=counts,
                     progress=not tiny)
    _log(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
    return MoepackFile(path)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def calibrate_bandwidth(device: torch.device, nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Host->device bytes/s of one large copy from pinned memory (memcpy bandwidth on the CPU)."""
    cuda = device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=cuda)
    synchronize(device)
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src)
        seconds = time.perf_counter() - t0
    return reps * nbytes / seconds


class _NoExperts:
    """Placeholder backend while the model loads (the benchmark builds its own per run)."""

    def forward(self, layer, x, topk_idx, topk_w):
        raise RuntimeError("no expert backend installed")

    def stats(self) -> dict:
        return {}

    def reset_stats(self) -> None:
        pass


def decode(model, prompt: torch.Tensor, tokens: int, warmup: int) -> tuple[float, int]:
    """Greedy decode after a prefill; returns (seconds for `tokens` timed steps, tokens)."""
    device = model.device
    token = model(prompt, 0, last_only=True)[-1].argmax()
    pos = prompt.numel()
    for _ in range(warmup):
        token = model(token.view(1), pos, last_only=True)[-1].argmax()
        pos += 1
    synchronize(device)
    model.experts.reset_stats()
    model.reset_cpu_step_phases()
    t0 = time.perf_counter()
    for _ in range(tokens):
        token = model(token.view(1), pos, last_only=True)[-1].argmax()  # stays on the device
        pos += 1
    synchronize(device)
    return time.perf_counter() - t0, tokens


def prefill(model, prompt: torch.Tensor) -> tuple[float, dict]:
    """One prompt at position 0 with the cache as decode left it (a new prompt in a running
    session): (seconds, the backend's statistics of that pass)."""
    synchronize(model.device)
    model.experts.reset_stats()
    t0 = time.perf_counter()
    model(prompt, 0, last_only=True)
    synchronize(model.device)
    return time.perf_counter() - t0, model.experts.stats()


def run_one(model, file: MoepackFile, host: HostStore, *, n_slots: int, variant: str, routing: str, policy: str,
            prefetch_layers: int, guess_accuracy: float, prompt: torch.Tensor, tokens: int, warmup: int,
            seed: int, bandwidth: float, cuda_graphs: bool | None = None, cpu_threads: int | None = None,
            long_prompt: torch.Tensor | None = None) -> dict:
    device = model.device
    backend = OffloadedExperts(
        file, device, model.dtype, n_slots=n_slots, policy="none" if variant == "naive" else policy,
        # explicit: the engine's default turns prefetch off in small per-layer pools (default_prefetch)
        prefetch=model.config.num_experts_per_tok if variant in ("prefetch", "hybrid") else 0, prefetch_layers=prefetch_layers,
        router_weights=model.router_weights, host=host, progress=False, cuda_graphs=cuda_graphs,
        hybrid=variant.startswith("hybrid"), cpu_threads=cpu_threads, stage_w2=variant == "hybrid-w2",
    )
    if routing == "trace":
        backend.routing = SyntheticRouting(reference_params(model.config.num_hidden_layers, model.config.num_local_experts),
                                           guess_accuracy, seed=seed)
    model.experts = backend
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    memory = {"after_setup": cuda_memory_breakdown(device)}  # slots, per-slot graphs, the model
    try:
        seconds, n = decode(model, prompt, tokens, warmup)
        s = backend.stats()
        memory["after_decode"] = cuda_memory_breakdown(device)
        pf = prefill(model, long_prompt) if long_prompt is not None else None
        memory["after_prefill"] = cuda_memory_breakdown(device) if pf is not None else None
    finally:
        model.experts = _NoExperts()
        backend.close()
        del backend
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    per_token = s["bytes_copied"] / n
    bound = bandwidth / per_token if per_token else float("inf")
    tok_s = n / seconds
    row = {
        "routing": routing, "variant": variant, "policy": "none" if variant == "naive" else policy,
        "slots": s["slots"], "tokens": n, "tok_s": tok_s, "hit_rate": s["hit_rate"],
        "prefetch_recall": s["prefetch_recall"], "prefetch_precision": s["prefetch_precision"],
        "copied_gbps": s["bytes_copied"] / seconds / 1e9, "copy_stream_gbps": s["copy_gbps"],
        "mb_per_token": per_token / 1e6, "bound_tok_s": bound, "ratio_to_bound": tok_s / bound if per_token else 0.0,
        "compute_wait_s": s["compute_wait_s"], "read_wait_s": s["read_wait_s"], "file_reads": s["file_reads"],
        "cuda_graphs": s["cuda_graphs"], "cpu_experts_per_token": s["cpu_experts"] / n,
        "split_experts_per_token": s["split_experts"] / n, "split_gpu_row_share": s.get("split_gpu_row_share", 0.0),
        # splits that found their w2 staged ahead (variant hybrid-w2)
        "staged_used_per_token": s["staged_w2"]["used"] / n if s.get("staged_w2") else 0.0,
        # how busy each resource was over the timed decode (1 - this is its idle share)
        "copy_busy": s["copy_busy_s"] / seconds, "cpu_busy": (s["cpu_expert_s"] + s["split_cpu_s"]) / seconds, "stats": s,
    }
    row["gpu_peak_gib"] = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else "-"
    row["gpu_memory"] = memory  # JSON only: where the reserved bytes sit (device.cuda_memory_breakdown)
    row["prefill_tok_s"], row["prefill_mb"] = "-", "-"
    if pf is not None:  # the prompt pass: each needed expert loaded once and run for all its tokens
        row["prefill_tok_s"] = long_prompt.numel() / pf[0]
        row["prefill_mb"] = pf[1]["bytes_copied"] / 1e6
        row["prefill_stats"] = pf[1]
    return row


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return info


def simulate_policy(policy: str, n_slots: int, layers: int, experts: int, prefetch: int, tokens: int,
                    guess_accuracy: float, seed: int) -> CacheStats:
    """One cache policy over `tokens` of trace routing calibrated to real Mixtral (top-2)."""
    routing = SyntheticRouting(reference_params(layers, experts), guess_accuracy, seed)
    return simulate(Planner(make_cache(policy, n_slots, layers, 2), prefetch), trace_steps(routing, tokens, prefetch))


def simulate_policies(layers: int, experts: int, tokens: int, guess_accuracy: float, seed: int) -> list[dict]:
    """Trace-driven hit rates of the cache policies (no model, no device)."""
    rows = []
    for per_layer in range(1, experts):  # 1: the per-layer minimum (decode runs in waves)
        for policy in ("layer", "shared", "lfu", "shared-lfu"):
            for prefetch in (0, 2):
                st = simulate_policy(policy, per_layer * layers, layers, experts, prefetch, tokens, guess_accuracy, seed)
                rows.append({"slots_per_layer": per_layer, "policy": policy, "prefetch": prefetch, "hit_rate": st.hit_rate,
                             "loads_per_token": st.loads / tokens, "prefetch_precision": st.prefetch_precision,
                             "prefetch_recall": st.prefetch_recall})
    return rows


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text (and markdown) table: columns are (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(format(r[k], f) if isinstance(r[k], (int, float)) else str(r[k]) for k, _, f in columns) + " |"
            for r in rows]
    return "\n".join([head, sep, *body])


RUN_COLUMNS = [
    ("budget", "GPU budget", ""), ("host", "host", ""), ("slots", "slots", "d"), ("routing", "routing", ""),
    ("variant", "variant", ""), ("cuda_graphs", "graphs", ""), ("tok_s", "tok/s", ".2f"), ("hit_rate", "hit rate", ".3f"),
    ("prefetch_recall", "pf recall", ".3f"), ("prefetch_precision", "pf precision", ".3f"),
    ("copied_gbps", "GB/s copied", ".2f"), ("mb_per_token", "MB/token", ".4g"), ("bound_tok_s", "bound tok/s", ".4g"),
    ("ratio_to_bound", "of bound", ".2f"), ("compute_wait_s", "wait s", ".2f"), ("file_reads", "file reads", "d"),
    ("cpu_experts_per_token", "CPU experts/token", ".1f"), ("split_experts_per_token", "split/token", ".1f"),
    ("staged_used_per_token", "w2 staged/token", ".2f"),
    ("copy_busy", "copy busy", ".2f"), ("cpu_busy", "CPU busy", ".2f"),
    ("gpu_peak_gib", "peak GiB", ".2f"), ("prefill_tok_s", "prefill tok/s", ".4g"), ("prefill_mb", "prefill MB", ".4g"),
]
SIM_COLUMNS = [
    ("slots_per_layer", "slots/layer", "d"), ("policy", "policy", ""), ("prefetch", "prefetch", "d"),
    ("hit_rate", "hit rate", ".3f"), ("loads_per_token", "loads/token", ".1f"),
    ("prefetch_precision", "pf precision", ".3f"), ("prefetch_recall", "pf recall", ".3f"),
]


@click.command(help=__doc__)
@click.option("--tiny", is_flag=True, help="Tiny shapes (hidden 64): runs on a CPU in seconds.")
@click.option("--layers", type=click.IntRange(1, 32), default=None, help="Layers [default: 32; 4 with --tiny].")
@click.option("--expert-bits", type=click.Choice(["2", "3"]), default="2", show_default=True)
@click.option("--expert-meta-bits", type=click.Choice(["8", "4"]), default="8", show_default=True,
              help="Scale/zero codes of the experts: 4 is 16% fewer bytes per 2-bit expert (format version 2).")
@click.option("--gpu-memory", "budgets", multiple=True, metavar="SIZE", help="GPU budget; repeat for a sweep [default: 12GiB].")
@click.option("--slots-per-layer", "slot_counts", multiple=True, type=click.IntRange(1), help="Budget given as expert slots per layer instead.")
@click.option("--host-memory", metavar="SIZE", help="RAM for expert records; the rest stream from the file.")
@click.option("--routing", type=click.Choice(["model", "trace", "all"]), default="all", show_default=True)
@click.option("--guess-accuracy", type=float, default=0.8, show_default=True, help="Trace routing: P(prefetch guess right), per expert.")
@click.option("--variant", "variant_names", type=click.Choice([*VARIANTS, *EXTRA_VARIANTS, "all"]), multiple=True,
              help="Repeat for several [default: all = naive, lru, prefetch].")
@click.option("--cpu-threads", type=click.IntRange(1), default=None, help="Threads of the CPU expert kernel (variant hybrid).")
@click.option("--cache-policy", type=click.Choice([p for p in POLICIES if p != "none"]), default="layer", show_default=True,
              help="layer: per-layer LRU; shared: one LRU pool; lfu: per-layer, least used evicted first; shared-lfu: one pool, least used evicted first.")
@click.option("--prefetch-layers", type=click.IntRange(1), default=1, show_default=True)
@click.option("--tokens", type=click.IntRange(1), default=32, show_default=True, help="Timed decode steps per run.")
@click.option("--warmup", type=click.IntRange(0), default=8, show_default=True, help="Untimed decode steps first (fill the cache).")
@click.option("--prompt-len", type=click.IntRange(1), default=16, show_default=True)
@click.option("--prefill-len", type=click.IntRange(0), default=0, show_default=True,
              help="Also time one prompt of this many tokens after each run's decode (0: off; issue #7 uses 512).")
@click.option("--device", "device_name", default="auto", show_default=True)
@click.option("--dtype", "dtype_name", default="auto", show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("~/.cache/moe-pack/bench"),
              show_default=True, help="Where the synthetic files are kept between runs.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--simulate", is_flag=True, help="Only print trace-driven cache simulations (no model, no device).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True), help="Write the results as JSON ('-': stdout).")
@click.option("--write-md", type=click.Path(dir_okay=False, path_type=Path), help="Append a section with the results to this markdown file.")
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
              help="Decode replays a captured CUDA graph per expert slot (runtime.graphs); CUDA only.")
@cpu_activations_option
def cli(tiny, layers, expert_bits, expert_meta_bits, budgets, slot_counts, host_memory, routing, guess_accuracy, variant_names, cpu_threads, cache_policy,
        prefetch_layers, tokens, warmup, prompt_len, prefill_len, device_name, dtype_name, cache_dir, seed, simulate, json_path, write_md,
        cuda_graphs):
    layers = layers or (4 if tiny else 32)
    if not 0 <= guess_accuracy <= 1:
        raise ConfigError(f"--guess-accuracy {guess_accuracy} must be in [0, 1]")
    argv = (click.get_current_context().obj or {}).get("argv", sys.argv[1:])
    command = "python -m runtime.bench " + " ".join(shlex.quote(a) for a in argv)
    result = {"command": command, "machine": machine(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if simulate:
        rows = simulate_policies(layers, 8, max(tokens, 200), guess_accuracy, seed)
        result["simulation"] = rows
        text = table(rows, SIM_COLUMNS)
        _emit(result, text, json_path, write_md, f"Cache policy simulation ({layers} layers, trace routing, guess accuracy {guess_accuracy})")
        return
    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name, device)
    if device.type == "cuda" and dtype == torch.float32:
        _log("note: float32 on CUDA doubles the workspace; float16 is the default")
    bits = int(expert_bits)
    file = bench_file(cache_dir, layers, tiny, bits, seed, int(expert_meta_bits))
    cfg = file.config
    ctx = max(prompt_len + warmup + tokens + 1, prefill_len)
    host_bytes = None if host_memory is None else parse_size(host_memory, "--host-memory")
    resident = plan_host(file.header, host_bytes, pinned=device.type == "cuda", staging=8)
    reserve = CUDA_RESERVE if device.type == "cuda" else 0
    dbytes = torch.empty((), dtype=dtype).element_size()

    def slots(budget: str, weights: int | None, variant: str = "lru") -> int:
        """Expert slots in `budget`; a hybrid variant's scratch sets come out of it too."""
        extra = hybrid_scratch_bytes(file, variant == "hybrid-w2") if variant.startswith("hybrid") else 0
        plan = plan_memory(file.header, parse_size(budget), context_tokens=ctx, dtype_bytes=dbytes, reserve_bytes=reserve + extra,
                           non_expert=weights, prefill_tokens=max(prompt_len, prefill_len), fused=fused_kernels(device),
                           source=str(file.path), embed_on_host=embeds_on_host(device),
                           policy="none" if variant == "naive" else cache_policy)
        if weights is not None:
            _log(plan.describe())
        return plan.n_slots

    budgets = budgets or (() if slot_counts else ("12GiB",))
    for b in budgets:  # refuse a too-small budget before loading anything
        slots(b, None)

    bandwidth = calibrate_bandwidth(device, nbytes=(16 << 20) if tiny else (256 << 20))
    if device.type == "cuda":  # the calibration buffers must not count against the budgets
        torch.cuda.empty_cache()
        # the pinned source sits in torch's pinned-memory cache (not returned to the OS), where
        # the host arena's plan, made from MemAvailable, does not see it
        host_empty_cache = getattr(torch._C, "_host_emptyCache", None)
        if host_empty_cache is not None:
            host_empty_cache()
    _log(f"calibration: {'pinned host->GPU' if device.type == 'cuda' else 'host memcpy'} {bandwidth / 1e9:.1f} GB/s")
    result["calibrated_h2d_gbps"] = bandwidth / 1e9
    t0 = time.perf_counter()
    model, _ = load_model(file, device, dtype, expert_backend_factory=lambda *a: _NoExperts(), ctx=ctx,
                          dequantize_at_load=False, cuda_graphs=None if cuda_graphs else False,
                          embed_on_host=embeds_on_host(device))
    host = HostStore(file, resident=resident, pin=device.type == "cuda", progress=not tiny, device=device)
    _log(f"loaded non-expert weights and {host.resident_count} experts into host RAM "
         f"({format_size(host.arena_bytes)}, {host.fill_s:.1f} s) in {time.perf_counter() - t0:.1f} s")
    weights = model_bytes(model)  # what the loaded model really holds replaces the header estimate
    configs = [(f"{n}/layer", n * cfg.num_hidden_layers) for n in slot_counts]  # (label, n_slots or a budget)
    configs += [(b, b) for b in budgets]
    routings = ["trace", "model"] if routing == "all" else [routing]
    variants = []
    for v in variant_names or ("all",):
        variants += [x for x in (VARIANTS if v == "all" else (v,)) if x not in variants]
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=gen).to(device)
    long_prompt = torch.randint(0, cfg.vocab_size, (prefill_len,), generator=gen).to(device) if prefill_len else None
    rows = []
    for label, n_slots in configs:
        for r in routings:
            for v in variants:
                n = slots(n_slots, weights, v) if isinstance(n_slots, str) else n_slots
                row = run_one(model, file, host, n_slots=n, variant=v, routing=r, policy=cache_policy,
                              prefetch_layers=prefetch_layers, guess_accuracy=guess_accuracy, prompt=prompt,
                              tokens=tokens, warmup=warmup, seed=seed, bandwidth=bandwidth,
                              cuda_graphs=None if cuda_graphs else False, cpu_threads=cpu_threads,
                              long_prompt=long_prompt)
                # each run's own: on the CPU auto gives a hybrid run int16 and the others int8
                row.update(budget=label, host=host_memory or "all", cpu_activations=cpu_activations_in_use(load=False))
                rows.append(row)
                if json_path and json_path != "-":  # results so far survive an interrupted sweep
                    Path(json_path).write_text(json.dumps({**result, "runs": rows}, indent=1, default=str) + "\n")
                _log(f"{label} {r} {v}{' graphs' if row['cuda_graphs'] else ''}: {row['tok_s']:.2f} tok/s, hit {row['hit_rate']:.3f}, "
                     f"{row['mb_per_token']:.4g} MB/token, bound {row['bound_tok_s']:.4g} tok/s")
    host.close()
    result.update(file=str(file.path), layers=cfg.num_hidden_layers, expert_bits=bits,
                  expert_meta_bits=int(expert_meta_bits), record_size=file.header.expert_layout.record_size,
                  device=str(device), dtype=str(dtype).removeprefix("torch."), guess_accuracy=guess_accuracy, runs=rows)
    title = (f"Offloading, {'tiny' if tiny else 'Mixtral-8x7B'} shapes, {cfg.num_hidden_layers} layers, experts {bits}-bit, "
             f"pinned H2D {bandwidth / 1e9:.1f} GB/s")
    result["cpu_activations"] = cpu_activations_in_use(load=False)  # the last run's; None: no CPU kernel ran
    _emit(result, table(rows, RUN_COLUMNS), json_path, write_md, title)


def _emit(result: dict, text: str, json_path: str | None, write_md: Path | None, title: str) -> None:
    print(title)
    print(text, flush=True)
    if json_path == "-":
        print(json.dumps(result, default=str))
    elif json_path:
        Path(json_path).write_text(json.dumps(result, indent=1, default=str) + "\n")
    if write_md:
        m = result["machine"]
        where = f"GPU {m['gpu']} (CUDA {m['cuda']}), " if "gpu" in m else "no GPU, "
        section = (
            f"\n## {title}\n\n"
            f"- date: {result['date']}\n- command: `{result['command']}`\n"
            f"- machine: {where}CPU {m['cpu']} ({m['cpu_count']} threads), torch {m['torch']}, Python {m['python']}\n\n"
            f"{text}\n"
        )
        write_md.parent.mkdir(parents=True, exist_ok=True)
        with open(write_md, "a", encoding="utf-8") as f:
            f.write(section)


def main(argv: list[str] | None = None) -> int:
    return run_command(cli, "python -m runtime.bench", argv, obj={"argv": sys.argv[1:] if argv is None else list(argv)})


if __name__ == "__main__":
    sys.exit(main())
