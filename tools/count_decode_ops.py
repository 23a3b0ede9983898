"""How many torch ops one decode layer's dense part dispatches (attention, norms, router), without
a GPU: each non-view op is a kernel launch on the GPU (a graph node when captured), so this
counts what kernel fusion and the one-graph step save.

    python tools/count_decode_ops.py

Runs on the CPU with a tiny fp16 file (dense projections: the GPU's GEMV permutations and
split-K sums are not counted). Three numbers: the per-layer graph's segment (it derives the
position's rotary rows and mask itself), the step graph's (they are shared by all layers),
and the step graph's with the fused small-op kernels (decode_graphs.fused_segment, run under
the Triton interpreter; each of its kernel launches counts as one op). Then a whole packed
layer (4-bit attention, 2-bit experts, the experts chosen on the device) as the GPU's step
graph runs it, with and without the fused small ops: every GEMV launch, x permutation,
int16 quantization and split-K sum counted. Its launch configs are the CPU's heuristic
(DEFAULT_SM_COUNT), so split-K and permutation choices may differ from a tuned GPU's.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.attention import DevicePosition  # noqa: E402
from runtime.baseline_bench import bench_config, bench_recipe  # noqa: E402
from runtime.decode_graphs import FUSED_ENV, DecodeGraphs, fused_segment, segment  # noqa: E402
from runtime.loader import load_model  # noqa: E402
from runtime.offload.synthfile import write_bench_file  # noqa: E402

# views and allocations launch no kernel
VIEWS = {"view", "t", "unsqueeze", "select", "slice", "transpose", "expand", "reshape", "_unsafe_view", "as_strided",
         "split", "split_with_sizes", "alias", "detach", "empty", "empty_like", "empty_strided"}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def kernels(self) -> dict[str, int]:
        return {k: v for k, v in self.ops.items() if k not in VIEWS}


class _CountedKernel:
    """A Triton kernel whose launches count as one op each in the active Count (the
    interpreter's own torch calls inside a launch are not counted)."""

    def __init__(self, kernel, name: str, counts: list):
        self.kernel, self.name, self.counts = kernel, name, counts

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            for c in self.counts:
                c.ops["triton:" + self.name] += 1
            with _disable_current_modes():
                return self.kernel[grid](*args, **kwargs)
        return launch


KERNELS = {"triton_decode": ("norm_kernel", "rotary_kernel", "attend_split_kernel", "attend_combine_kernel"), "triton_gemv": ("qgemv_kernel", "xquant_kernel")}


def _counted(fn) -> Count:
    """fn() under a Count, each of the Triton kernels it launches (interpreted) counted as one op."""
    import importlib

    c = Count()
    mods = {m: importlib.import_module(f"runtime.kernels.{m}") for m in KERNELS}
    saved = {(m, n): getattr(mods[m], n) for m, names in KERNELS.items() for n in names}
    for (m, n), k in saved.items():
        setattr(mods[m], n, _CountedKernel(k, n, [c]))
    try:
        with c:
            fn()
    finally:
        for (m, n), k in saved.items():
            setattr(mods[m], n, k)
    return c


def _whole_layer(path: Path, fused: bool) -> Count:
    """One packed layer of a one-token step as the step graph runs it (the experts chosen on
    the device, kernels.indexed_expert_ffn), every GEMV, permutation, sum and Triton launch
    counted: fused (decode_graphs.fused_segment, the experts' partials left for the next
    layer's norm) or with torch's small ops."""
    from runtime.experts import resident_experts

    os.environ[FUSED_ENV] = "1" if fused else "0"
    factory = functools.partial(resident_experts, device_routing=True)
    model, _ = load_model(path, "cpu", torch.float32, ctx=32, cuda_graphs=True, expert_backend_factory=factory)
    model(torch.arange(2), 0)
    layer, h = model.layers[0], torch.randn(1, model.config.hidden_size)
    at = DevicePosition(torch.tensor([2]), torch.arange(32), layer.attn.rotary)
    at.bias(layer.attn.sliding_window, h.dtype)  # once per step, outside the count

    def run():
        if fused:
            fmt = model.experts.input_format(h, model.config.num_experts_per_tok)
            _, x, idx, w, xf = fused_segment(layer, h, None, at, model.cache, fmt)
            model.experts.forward_routed(0, x, idx, w, partials=True, prepared=xf)
        else:
            h_mid, x, idx, w = segment(layer, h, at, model.cache)
            h_mid + model.experts.forward_routed(0, x, idx, w)
    return _counted(run)


def main() -> int:
    # the fused kernels run interpreted (triton reads this when a kernel module is imported);
    # restored after: a test may call main()
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return _main()
    finally:
        os.environ.pop(FUSED_ENV, None)
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def _main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_bench_file(Path(tmp) / "tiny.moepack", bench_config(2, True), bench_recipe("fp16"), progress=False)
        model, _ = load_model(path, "cpu", torch.float32, ctx=32, cuda_graphs=True)
    os.environ[FUSED_ENV] = "0"  # segment: torch's small ops
    model(torch.arange(4), 0)
    g = DecodeGraphs(model)
    g.begin(torch.zeros(1, model.config.hidden_size), 4)
    with Count() as per_layer:
        g.layer(0)
    at = DevicePosition(g.pos, g.key_pos, model.layers[0].attn.rotary)  # once per step, outside the count
    at.allowed(model.layers[0].attn.sliding_window)
    at.bias(model.layers[0].attn.sliding_window, g.h.dtype)
    with Count() as per_step:
        segment(model.layers[0], g.h, at, model.cache)
    os.environ[FUSED_ENV] = "1"
    fused = _counted(lambda: fused_segment(model.layers[0], g.h, None, at, model.cache))
    rows = [("a graph per layer", per_layer), ("one graph per step", per_step),
            ("one graph per step, fused small ops", fused)]
    with tempfile.TemporaryDirectory() as tmp:
        # q, k and v stack at this width (a whole number of 256-group meta groups each)
        cfg = dataclasses.replace(bench_config(1, True), hidden_size=256, num_attention_heads=8, head_dim=32)
        packed = write_bench_file(Path(tmp) / "packed.moepack", cfg, bench_recipe("4/2m4"), progress=False)
        rows += [("packed 4/2m4, whole layer with experts, step graph", _whole_layer(packed, False)),
                 ("packed 4/2m4, whole layer with experts, step graph, fused", _whole_layer(packed, True))]
    for name, c in rows:
        k = c.kernels()
        print(f"{name}: {sum(k.values())} non-view ops per layer  {dict(sorted(k.items()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
