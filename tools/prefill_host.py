"""Host work of the GPU's prompt path, measured without a GPU: per expert, and per layer.

    python tools/prefill_host.py [--tokens 17] [--calls 2000] [--layer-tokens 512] [--json out.json]

Why: a 512-token prompt with every expert resident ran at 1371 tok/s on the H100 host
(docs/BENCHMARKS.md section 8), 11.7 ms per layer, while kernel_bench puts the GPU's share
of a layer (8 experts of ~128 rows: dequantize + cuBLAS) near 2-3 ms. The likely rest is
the host: Python and launches per expert, eight experts per layer, on a host where a Triton
launch cost ~110 us and a small torch op ~11 us (section 6).

"expert": kernels.fused_expert_ffn's many-token path with the GPU's work stubbed out: each
Triton launch a no-op that counts itself, each dense matmul zeros of its shape. The record
is a 2-bit one (groups of 16, 4-bit meta, Mixtral's layout) at an eighth of Mixtral's
width, so the elementwise ops that still run cost little: the host's Python and torch
dispatch do not depend on the width. Timed: that host work per expert, without the CUDA
driver's share of each launch and without Triton's own launcher (the counts say how many).

"layer": a prompt through a 2-layer model of Mixtral's structure at that width, the experts
resident and routed as on a GPU, every launch counted by kind (not timed: at a prompt's
length the CPU's own attention and elementwise work would swamp the host's share). Then
one MoE block timed the same way as an expert: 8 experts of 17 rows each (sort, gather,
experts, weights, scatter).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from count_decode_ops import VIEWS as DECODE_VIEWS  # noqa: E402
from formats.qtensor import QuantSpec  # noqa: E402
from kernel_bench import expert_layout  # noqa: E402 (w1, w3, w2 back to back, as formats.writer lays out a record)
from runtime.kernels.qgemv import PREFILL_THRESHOLD  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

# ops that launch no kernel: count_decode_ops' list, plus no-op conversions (a conversion that
# copies dispatches _to_copy as well, and that counts)
VIEWS = DECODE_VIEWS | {"to", "resolve_conj", "resolve_neg"}

HIDDEN, INTERMEDIATE = 512, 1792  # Mixtral-8x7B's 4096 and 14336 over 8
ROUTER_NUMEL = 8 * HIDDEN
ROWS = 17  # rows per expert of the timed MoE block: the fewest the prompt path takes
TRITON_KERNELS = {"triton_dequant": ("dequant_kernel", "dequant_words_kernel"), "triton_gemm": ("qgemm_kernel",),
                  "triton_gemv": ("qgemv_kernel", "xquant_kernel")}


class _Counter(TorchDispatchMode):
    """Counts the Triton launches (see stubbed) and the torch calls that launch a kernel
    (the stubbed matmuls count as one each)."""

    def __init__(self):
        super().__init__()
        self.triton = 0
        self.torch = 0
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in VIEWS:
            self.torch += 1
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def stubbed(counter: _Counter):
    """Triton launches as counted no-ops, dense matmuls as zeros (or their `out` untouched),
    for the duration."""
    import importlib

    import torch.nn.functional as F

    class Launch:
        def __init__(self, name: str):
            self.name = name

        def __getitem__(self, grid):
            name = self.name

            def run(*args, **kwargs):
                counter.triton += 1
                counter.ops["triton:" + name] += 1
            return run

    saved = []
    for mod_name, names in TRITON_KERNELS.items():
        mod = importlib.import_module(f"runtime.kernels.{mod_name}")
        for n in names:
            saved.append((mod, n, getattr(mod, n)))
            setattr(mod, n, Launch(n))

    zeros: dict[tuple, torch.Tensor] = {}

    def linear(x, w, b=None):  # one made per shape (no denormals in it: they slow the CPU's silu)
        counter.torch += 1
        counter.ops["linear"] += 1
        if w.numel() <= ROUTER_NUMEL:  # routers stay real: a prompt's tokens must spread over the experts
            return real_linear(x, w, b)
        shape = (*x.shape[:-1], w.shape[0])
        if (shape, x.dtype) not in zeros:
            with _disable_current_modes():
                zeros[(shape, x.dtype)] = torch.zeros(shape, dtype=x.dtype)
        return zeros[(shape, x.dtype)]

    def matmul(a, b, out=None):
        if b.numel() <= ROUTER_NUMEL:
            return real_matmul(a, b, out=out)
        counter.torch += 1
        counter.ops["matmul"] += 1
        if out is None:
            return linear(a, b.t())
        return out.zero_()  # as zeros as linear's

    real_linear, real_matmul = F.linear, torch.matmul
    saved += [(F, "linear", F.linear), (torch, "matmul", torch.matmul)]
    F.linear, torch.matmul = linear, matmul
    try:
        yield
    finally:
        for mod, n, k in saved:
            setattr(mod, n, k)


def measure(tokens: int, calls: int) -> dict:
    from runtime.kernels.expert import fused_expert_ffn

    spec = QuantSpec(bits=2, group_size=16, meta_bits=4, meta_group_size=128)
    layout = expert_layout(HIDDEN, INTERMEDIATE, spec)
    record = torch.zeros(layout.record_size, dtype=torch.uint8)
    x = torch.zeros(tokens, HIDDEN)  # float32: the CPU's own elementwise work stays small
    counter = _Counter()
    with stubbed(counter):
        for _ in range(20):
            fused_expert_ffn(record, layout, x)
        t0 = time.perf_counter()
        for _ in range(calls):
            fused_expert_ffn(record, layout, x)
        dt = (time.perf_counter() - t0) / calls
        counter.triton = counter.torch = 0
        counter.ops.clear()
        with counter:
            fused_expert_ffn(record, layout, x)
    return {"tokens": tokens, "calls": calls, "host_us_per_expert": round(dt * 1e6, 1),
            "triton_launches_per_expert": counter.triton, "torch_kernels_per_expert": counter.torch,
            "prefill_mode": os.environ.get("MOEPACK_PREFILL", "") or "dequant"}


def measure_layer(tokens: int, calls: int) -> dict:
    """A prompt of `tokens` through a 2-layer packed model of Mixtral's structure at width
    HIDDEN (4-bit attention, 2-bit experts with 4-bit meta, 8 experts, q/k/v stacked), the
    experts resident and routed as on a GPU: the launches per layer, by kind. (Not timed:
    at a prompt's length the CPU's own attention and elementwise work would swamp the host
    overhead.)"""
    import dataclasses
    import functools
    import tempfile

    from runtime.baseline_bench import bench_config, bench_recipe
    from runtime.experts import resident_experts
    from runtime.loader import load_model
    from runtime.offload.synthfile import write_bench_file

    cfg = dataclasses.replace(bench_config(2, False), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                              num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=512)
    counter = _Counter()
    with tempfile.TemporaryDirectory() as tmp, stubbed(counter):
        path = write_bench_file(Path(tmp) / "layer.moepack", cfg, bench_recipe("4/2m4"), progress=False)
        model, _ = load_model(path, "cpu", torch.float32, ctx=tokens, cuda_graphs=False,
                              expert_backend_factory=functools.partial(resident_experts, device_routing=True))
        prompt = torch.arange(tokens) % cfg.vocab_size
        for _ in range(3):
            model(prompt, 0, last_only=True)
        model.experts.reset_stats()
        counter.triton = counter.torch = 0
        counter.ops.clear()
        with counter:
            model(prompt, 0, last_only=True)
        evals = model.experts.stats().get("expert_evals", 0) / cfg.num_hidden_layers
        triton, kernels, ops = counter.triton, counter.torch, dict(counter.ops)
        # the MoE block's host work alone, timed: every expert ROWS rows, as few as the prompt path takes
        e, k = cfg.num_local_experts, cfg.num_experts_per_tok
        t = ROWS * e // k
        x = torch.zeros(t, cfg.hidden_size)
        idx, w = (torch.arange(t * k) % e).view(t, k), torch.full((t, k), 1.0 / k)
        with torch.inference_mode():  # as the model runs it
            for _ in range(3):
                model.experts.forward(0, x, idx, w)
            t0 = time.perf_counter()
            for _ in range(calls):
                model.experts.forward(0, x, idx, w)
            moe_us = (time.perf_counter() - t0) / calls * 1e6
    layers = cfg.num_hidden_layers
    return {"tokens": tokens, "moe_block_host_us": round(moe_us, 1), "moe_block_rows_per_expert": ROWS,
            "experts_per_layer": round(evals, 2), "triton_launches_per_layer": triton / layers,
            "torch_kernels_per_layer": kernels / layers,
            "per_layer": {k: v / layers for k, v in sorted(ops.items())},
            "prefill_mode": os.environ.get("MOEPACK_PREFILL", "") or "dequant"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=17, help="rows of the expert's input (> 16: the prompt path)")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--layer-tokens", type=int, default=512, help="the prompt of the layer count")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args(argv)
    if args.tokens <= PREFILL_THRESHOLD:
        ap.error(f"--tokens must exceed {PREFILL_THRESHOLD}: fewer take the decode path")
    # the GPU's code paths on CPU tensors (runtime.kernels.use_fused), every launch stubbed;
    # restored after: a test may call main()
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        result = {"expert": measure(args.tokens, args.calls),
                  "layer": measure_layer(args.layer_tokens, max(1, args.calls // 10))}
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
