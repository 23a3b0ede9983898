"""How many torch ops one decode layer's dense part dispatches (attention, norms, router), without
a GPU: each non-view op is a kernel launch on the GPU (a graph node when captured), so this
counts what kernel fusion and the one-graph step save.

    python tools/count_decode_ops.py

Runs on the CPU with a tiny fp16 file (dense projections: the GPU's GEMV permutations and
split-K sums are not counted). Two numbers: the per-layer graph's segment (it derives the
position's rotary rows and mask itself) and the step graph's (they are shared by all layers).
"""

from __future__ import annotations

import collections
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.attention import DevicePosition  # noqa: E402
from runtime.baseline_bench import bench_config, bench_recipe  # noqa: E402
from runtime.decode_graphs import DecodeGraphs, segment  # noqa: E402
from runtime.loader import load_model  # noqa: E402
from runtime.offload.synthfile import write_bench_file  # noqa: E402

VIEWS = {"view", "t", "unsqueeze", "select", "slice", "transpose", "expand", "reshape", "_unsafe_view", "as_strided",
         "split", "split_with_sizes", "alias", "detach"}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def kernels(self) -> dict[str, int]:
        return {k: v for k, v in self.ops.items() if k not in VIEWS}


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_bench_file(Path(tmp) / "tiny.moepack", bench_config(2, True), bench_recipe("fp16"), progress=False)
        model, _ = load_model(path, "cpu", torch.float32, ctx=32, cuda_graphs=True)
    model(torch.arange(4), 0)
    g = DecodeGraphs(model)
    g.begin(torch.zeros(1, model.config.hidden_size), 4)
    with Count() as per_layer:
        g.layer(0)
    at = DevicePosition(g.pos, g.key_pos, model.layers[0].attn.rotary)  # once per step, outside the count
    at.allowed(model.layers[0].attn.sliding_window)
    with Count() as per_step:
        segment(model.layers[0], g.h, at, model.cache)
    for name, c in (("a graph per layer", per_layer), ("one graph per step", per_step)):
        k = c.kernels()
        print(f"{name}: {sum(k.values())} non-view ops per layer  {dict(sorted(k.items()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
