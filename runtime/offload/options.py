"""The offloading options of `runtime.generate` (and the benchmark), and the backend factory
they build for runtime.loader.load_model.

generate.py adds them with the `offload_options` decorator, turns the parsed values into an
OffloadOptions with `OffloadOptions.from_cli(**kwargs)`, calls `preflight(...)` before
loading anything (a too-small --gpu-memory fails there, naming the smallest budget that
works), and passes `make_backend_factory(...)` to load_model (None: keep every expert resident).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import click
import torch

from formats.errors import ConfigError
from formats.reader import MoepackFile

from .budget import GiB, MiB, POLICIES, MemoryPlan, embed_table_bytes, grouped_prompt_extra, parse_size, plan_memory
from .host import plan_host

CUDA_RESERVE = 512 * MiB  # CUDA context + allocator slack, outside PyTorch's tensors
DEFAULT_MARGIN = 1 * GiB  # left free when --gpu-memory is not given
DEFAULT_STAGING = 8
# what the default cache policy becomes where a budget (or --expert-slots) holds fewer slots
# than layers: one pool for all layers runs in one layer's top-k, and by use counts it keeps
# the busiest experts of all layers (docs/BENCHMARKS.md section 31)
SMALL_BUDGET_POLICY = "shared-lfu"


@dataclass(frozen=True)
class OffloadOptions:
    gpu_memory: int | None = None  # bytes; None: free GPU memory less a margin
    host_memory: int | None = None  # bytes; None: every expert in RAM
    prefetch: int | None = None  # experts guessed per future layer; None: top-k (0 with policy "none")
    prefetch_layers: int = 1
    cache_policy: str = "layer"
    expert_slots: int | None = None  # exact slot count instead of one derived from the budget
    io_threads: int = 4
    staging: int = DEFAULT_STAGING
    offload: bool | None = None  # None: offload only when an option asks for it or the GPU is too small
    hybrid: bool = False  # decode may compute missed experts on the CPU instead of copying them
    cpu_threads: int | None = None  # threads of the CPU expert kernel (None: the kernel's default)
    prefetch_w2: bool = False  # hybrid: the next layer's likely miss gets its w2 copied ahead
    policy_given: bool = True  # False: cache_policy is the default, and may become SMALL_BUDGET_POLICY

    def __post_init__(self) -> None:
        if self.cache_policy not in POLICIES:
            raise ConfigError(f"--cache-policy {self.cache_policy!r} is not one of {', '.join(POLICIES)}")
        if self.prefetch is not None and self.prefetch < 0:
            raise ConfigError(f"--prefetch {self.prefetch} must be >= 0", hint="0 disables speculative prefetch")
        if self.prefetch_layers < 1:
            raise ConfigError(f"--prefetch-layers {self.prefetch_layers} must be at least 1")
        if self.expert_slots is not None and self.expert_slots < 1:
            raise ConfigError(f"--expert-slots {self.expert_slots} must be at least 1")
        if self.io_threads < 1:
            raise ConfigError(f"--io-threads {self.io_threads} must be at least 1")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError(f"--cpu-threads {self.cpu_threads} must be at least 1")
        if self.staging < 1:
            raise ConfigError(f"staging buffers ({self.staging}) must be at least 1")
        if self.prefetch_w2 and not self.hybrid:
            raise ConfigError("--prefetch-w2 stages w2 for a split expert: it needs --hybrid", hint="add --hybrid")

    @classmethod
    def from_cli(cls, gpu_memory: str | None = None, host_memory: str | None = None, prefetch: int | None = None,
                 prefetch_layers: int = 1, cache_policy: str | None = None, expert_slots: int | None = None,
                 io_threads: int = 4, offload: bool | None = None, hybrid: bool = False,
                 cpu_threads: int | None = None, prefetch_w2: bool = False, **_other) -> "OffloadOptions":
        """From the values click parsed (other keyword arguments of the command are ignored)."""
        return cls(
            gpu_memory=None if gpu_memory is None else parse_size(gpu_memory, "--gpu-memory"),
            host_memory=None if host_memory is None else parse_size(host_memory, "--host-memory"),
            prefetch=prefetch, prefetch_layers=prefetch_layers, cache_policy=cache_policy or "layer",
            expert_slots=expert_slots, io_threads=io_threads, offload=offload, hybrid=hybrid,
            cpu_threads=cpu_threads, prefetch_w2=prefetch_w2, policy_given=cache_policy is not None,
        )

    @property
    def requested(self) -> bool:
        """Did the user ask for offloading explicitly?"""
        if self.offload is not None:
            return self.offload
        return any(v is not None for v in (self.gpu_memory, self.host_memory, self.expert_slots, self.prefetch)) \
            or self.cache_policy != "layer" or self.prefetch_layers != 1 or self.hybrid


OPTION_NAMES = ("gpu_memory", "host_memory", "prefetch", "prefetch_layers", "cache_policy", "expert_slots", "io_threads", "offload",
                "hybrid", "cpu_threads", "prefetch_w2")


def offload_options(f: Callable) -> Callable:
    """click decorator adding the offloading options to a command."""
    opts = [
        click.option("--offload/--no-offload", "offload", default=None,
                     help="Stream experts through a GPU cache [default: when an option below is given, or the GPU is too small]."),
        click.option("--gpu-memory", metavar="SIZE", help="GPU memory for weights, KV cache, workspace and expert cache "
                     "(12GiB, 800MB, 1.5G) [default: free GPU memory less 1 GiB]."),
        click.option("--host-memory", metavar="SIZE", help="RAM for expert records; the rest are read from the file on "
                     "demand [default: all experts in RAM]."),
        click.option("--prefetch", type=int, default=None, metavar="N",
                     help="Experts guessed and prefetched per next layer [default: top-k, or 0 where the cache has at most top-k + 1 slots per layer; 0 disables]."),
        click.option("--prefetch-layers", type=int, default=1, show_default=True, help="How many layers ahead to prefetch."),
        click.option("--cache-policy", type=click.Choice(POLICIES), default=None,
                     help="layer: LRU per layer (at least one slot each); shared: one LRU pool for all layers; lfu: per layer, the least used expert is evicted (counts start from the file's calibration); shared-lfu: one pool evicting the least used expert, which runs in the smallest budget (one layer's top-k slots) and keeps the busiest experts of all layers; none: load every expert on every use [default: layer, or shared-lfu where the budget holds fewer slots than layers]."),
        click.option("--expert-slots", type=int, default=None, metavar="N", help="Exact number of GPU expert slots (overrides the budget's count)."),
        click.option("--io-threads", type=int, default=4, show_default=True, help="Threads reading streamed experts from the file."),
        click.option("--hybrid", is_flag=True, help="Decode computes some missed experts on the CPU (from host RAM) while "
                     "others are copied, or splits one between both, by measured costs."),
        click.option("--cpu-threads", type=int, default=None, metavar="N", help="Threads of the CPU expert kernel (--hybrid)."),
        click.option("--prefetch-w2", is_flag=True, help="With --hybrid: while a layer computes, copy the w2 of the next "
                     "layer's likely miss ahead, so splitting it costs the link only its GPU rows (one more scratch set; "
                     "whole-expert --prefetch then defaults to 0)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _budget(opts: OffloadOptions, device: torch.device) -> tuple[int, int]:
    """(budget, reserve) in bytes for `device`."""
    if opts.gpu_memory is not None:
        return opts.gpu_memory, CUDA_RESERVE if device.type == "cuda" else 0
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # free memory already excludes the CUDA context; keep a margin for everything else
        return max(0, free - DEFAULT_MARGIN), 0
    return 2**62, 0  # the CPU: no device budget unless one is given


def fused_kernels(device: torch.device) -> bool:
    """Whether the model on `device` runs the fused kernels (CUDA with Triton): the memory plan's
    workspace is then a prefill scratch, not the plain path's float32 dequantization."""
    from ..kernels import triton_available

    return torch.device(device).type == "cuda" and triton_available()


def embeds_on_host(device: torch.device) -> bool:
    """Whether an offloaded model on `device` keeps its embedding table in host RAM
    (load_model(embed_on_host=True)): on CUDA, where its 262 MB (Mixtral-8x7B) buy ~5 more
    expert slots and a step uploads only its tokens' rows, as llama.cpp keeps token_embd on
    the CPU. Elsewhere host RAM is the device's memory."""
    return torch.device(device).type == "cuda"


def _hybrid_bytes(file: MoepackFile, opts: OffloadOptions) -> int:
    """Device bytes --hybrid adds: a scratch set per expert a token can split (each holds one
    w2 and the GPU's rows of w1/w3, copied while the CPU computes the other rows;
    runtime.offload.split), and one more with --prefetch-w2."""
    if not opts.hybrid:
        return 0
    return hybrid_scratch_bytes(file, opts.prefetch_w2)


def hybrid_scratch_bytes(file: MoepackFile, prefetch_w2: bool) -> int:
    """What OffloadedExperts(hybrid=True, stage_w2=prefetch_w2) allocates for split experts."""
    from .split import scratch_bytes, split_rows_enabled

    sets = file.config.num_experts_per_tok + prefetch_w2
    return sets * scratch_bytes(file.header.expert_layout, split_rows_enabled())


def preflight(file: MoepackFile, opts: OffloadOptions, device: torch.device, dtype: torch.dtype, ctx: int,
              dequantize_at_load: bool = False) -> MemoryPlan | None:
    """The GPU plan, checked before anything is loaded; None when every expert stays resident."""
    if opts.offload is False:
        return None
    device = torch.device(device)
    budget, reserve = _budget(opts, device)
    reserve += _hybrid_bytes(file, opts)
    dbytes = _dtype_bytes(dtype)
    fused = fused_kernels(device)
    plan = plan_slots(file, opts, budget, context_tokens=ctx, dtype_bytes=dbytes, reserve_bytes=reserve,
                      dequantize_at_load=dequantize_at_load, fused=fused, source=str(file.path),
                      option="--gpu-memory" if opts.gpu_memory is not None else "the free GPU memory",
                      embed_on_host=embeds_on_host(device))
    # unasked, offloading starts only where every expert, the table (which then stays on the
    # device) and the resident prompt path's larger scratch do not fit
    table = embed_table_bytes(file.header, dbytes) if plan.embed_on_host else 0
    if not opts.requested and plan.all_resident and budget - plan.fixed_bytes - plan.slot_bytes >= table + (
            _resident_prompt_extra(file, dbytes) if fused else 0):
        return None  # resident: the experts go from the file's map to the device, no host arena
    plan_host(file.header, opts.host_memory, pinned=device.type == "cuda", staging=opts.staging)
    return plan


def _resident_prompt_extra(file: MoepackFile, dtype_bytes: int) -> int:
    from ..kernels.expert import prompt_chunk_experts

    c = file.config
    return grouped_prompt_extra(file.header, dtype_bytes,
                                prompt_chunk_experts(c.intermediate_size, c.hidden_size, dtype_bytes))


def plan_slots(file: MoepackFile, opts: OffloadOptions, budget: int, **kw) -> MemoryPlan:
    """plan_memory under opts' cache policy, with --expert-slots checked against its minimum.
    Left to its default, a policy whose pools the budget (or --expert-slots) cannot give one
    slot per layer becomes SMALL_BUDGET_POLICY, so a small card runs instead of being refused;
    where that does not fit either, its error names the smallest budget of all."""
    try:
        plan = plan_memory(file.header, budget, policy=opts.cache_policy, **kw)
        _check_slots(opts, plan)
        return plan
    except ConfigError:
        if opts.policy_given or opts.cache_policy == SMALL_BUDGET_POLICY:
            raise
    plan = plan_memory(file.header, budget, policy=SMALL_BUDGET_POLICY, **kw)
    _check_slots(opts, plan)
    return plan


def _check_slots(opts: OffloadOptions, plan: MemoryPlan) -> None:
    if opts.expert_slots is not None and opts.expert_slots < plan.min_slots:
        raise ConfigError(f"--expert-slots {opts.expert_slots} is below the {plan.min_slots} slots a token needs "
                          f"with --cache-policy {plan.policy}",
                          hint=f"pass --expert-slots {plan.min_slots} or more")


def model_bytes(model: torch.nn.Module) -> int:
    """Device bytes of a loaded model's parameters and buffers (KV cache excluded; a table kept
    in host RAM is not the device's)."""
    device = getattr(model, "device", None)
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if device is not None and t.device.type != torch.device(device).type:
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


def make_backend_factory(opts: OffloadOptions, *, ctx: int, progress: bool = True, cuda_graphs: bool | None = None):
    """A load_model expert_backend_factory building OffloadedExperts for `opts`. The slot count
    is re-planned with the bytes the loaded model really holds. cuda_graphs: see
    OffloadedExperts (None: on CUDA)."""

    def factory(file: MoepackFile, model, device: torch.device, dtype: torch.dtype):
        from .engine import OffloadedExperts

        device = torch.device(device)
        budget, reserve = _budget(opts, device) if opts.gpu_memory is not None or device.type != "cuda" else (None, 0)
        if budget is None:
            # the model is loaded now: the default budget is what is still free, plus what it took
            free, _ = torch.cuda.mem_get_info(device)
            budget = max(0, free - DEFAULT_MARGIN) + torch.cuda.memory_allocated(device)
        plan = plan_slots(file, opts, budget, context_tokens=getattr(model, "max_ctx", ctx), dtype_bytes=_dtype_bytes(dtype),
                          reserve_bytes=reserve + _hybrid_bytes(file, opts), non_expert=model_bytes(model),
                          fused=fused_kernels(device), source=str(file.path),
                          embed_on_host=getattr(model, "embed_on_host", False))
        n_slots = opts.expert_slots if opts.expert_slots is not None else plan.n_slots
        resident = plan_host(file.header, opts.host_memory, pinned=device.type == "cuda", staging=opts.staging)
        backend = OffloadedExperts(
            file, device, dtype, n_slots=n_slots, policy=plan.policy, prefetch=opts.prefetch,
            prefetch_layers=opts.prefetch_layers, router_weights=model.router_weights, host_resident=resident,
            staging=opts.staging, io_threads=opts.io_threads, progress=progress, cuda_graphs=cuda_graphs,
            hybrid=opts.hybrid, cpu_threads=opts.cpu_threads, stage_w2=opts.prefetch_w2,
        )
        backend.plan = replace(plan, n_slots=backend.cache.n_slots)
        return backend

    return factory

