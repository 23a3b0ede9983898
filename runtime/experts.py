"""Experts: the FFN of one packed expert record, the interface every expert backend
implements, and the simplest backend (every record resident on the compute device).

The model only ever calls `ExpertBackend.forward`, so an offloading engine can replace
where experts live without touching the model.
"""

from __future__ import annotations

import warnings
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from formats.errors import ConfigError
from formats.header import ExpertLayout
from formats.reader import MoepackFile

from .graphs import expert_graphs
from .kernels import (PREFILL_THRESHOLD, fused_expert_ffn, grouped_expert_ffn, grouped_prompt_ffn, indexed_expert_ffn,
                      indexed_input_format, indexed_supported, interpreting, prompt_chunk, use_fused)
from .kernels.prefill import prefill_mode


# More tokens than this on the CPU: dequantize once (cpu_expert.dequantize_packed) and use
# torch's matmul. On dev-cpu (2 threads) that costs a Mixtral expert ~0.53 s at 64 tokens and
# ~1.0 s at 256, a 4096 x 4096 attention matrix at 4 bits ~47 ms and ~97 ms. The numba kernel
# re-decodes every weight per token (~13 ms a token per expert there), so it stops at 64. The
# compiled kernel decodes each code once for 2-4 tokens: 0.21 s for a 2-bit expert at 64 tokens
# and 0.93 s at 256 (attention: 21 and 90 ms), so the two meet near 256 (BENCHMARKS.md section 19).
CPU_KERNEL_MAX_TOKENS = 64
NATIVE_MAX_TOKENS = 256


def _cpu_kernel_applies(record: torch.Tensor, layout: ExpertLayout, x: torch.Tensor) -> bool:
    """Whether runtime.cpu_expert computes this call: a packed expert in CPU memory, its compiled
    kernel built or numba installed, and no more tokens than the limits above allow. (Its
    fallback calls plain_expert_ffn, never expert_ffn, so the two cannot call each other in a
    loop.)"""
    if x.device.type != "cpu" or record.device.type != "cpu" or x.shape[0] > NATIVE_MAX_TOKENS:
        return False
    if not all(m.spec.quantized for m in layout.matrices):
        return False
    from .cpu_expert import _native, cpu_expert_available  # the kernels load only on the first call

    if x.shape[0] > CPU_KERNEL_MAX_TOKENS:  # only the compiled kernel's one-call expert goes on
        from .cpu_native import expert_descriptor

        return _native() is not None and expert_descriptor(layout) is not None
    return cpu_expert_available()


def expert_ffn(record: torch.Tensor, layout: ExpertLayout, x: torch.Tensor, dtype: torch.dtype,
               prompt_pair: bool = True) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x) for x: [T, H] with the expert in `record` (uint8, on x's device).
    prompt_pair: see kernels.fused_expert_ffn (False keeps a prompt's scratch to one matrix)."""
    if use_fused(x):  # fused dequantize-GEMV (few tokens) or Triton dequantize + matmul (many)
        return fused_expert_ffn(record, layout, x.to(dtype), prompt_pair=prompt_pair).to(x.dtype)
    if _cpu_kernel_applies(record, layout, x):  # multi-threaded GEMVs on the packed bytes (runtime.cpu_expert)
        from .cpu_expert import cpu_expert_ffn

        return cpu_expert_ffn(record, layout, x, threads=torch.get_num_threads())
    return plain_expert_ffn(record, layout, x, dtype)


def plain_expert_ffn(record: torch.Tensor, layout: ExpertLayout, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """expert_ffn in plain torch: dequantize the three matrices to `dtype`, then matmuls, one
    matrix at a time (on the CPU in float32 each goes through the thread's scratch buffer:
    cpu_expert.dequantize_packed(transient=True))."""
    from .cpu_expert import dequantize_packed  # imports no kernel until a CPU call needs one

    def w(name: str) -> torch.Tensor:
        m = layout.matrix(name)
        return dequantize_packed(record, m.shape, m.spec, m.offset, dtype, transient=True)
    h = x.to(dtype)
    a = F.linear(h, w("w1"))  # [T, I], computed before w3 may overwrite the scratch
    h = F.silu(a, inplace=True).mul_(F.linear(h, w("w3")))
    return F.linear(h, w("w2")).to(x.dtype)  # [T, H]


@runtime_checkable
class ExpertBackend(Protocol):
    def forward(self, layer: int, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        """x: [T, H] router input of `layer`; topk_idx: [T, k] int64; topk_w: [T, k] -> MoE output [T, H]."""
        ...

    def stats(self) -> dict:
        ...

    def reset_stats(self) -> None:
        ...


def host_tensor(arr: np.ndarray) -> torch.Tensor:
    """A torch copy of a (read-only, memory-mapped) numpy array, without torch's
    non-writable-buffer warning that torch.from_numpy gives for a read-only map."""
    out = torch.empty(arr.shape, dtype=torch.uint8)
    out.numpy()[...] = arr
    return out


class MappedRecords:
    """Every expert record of a file as a read-only view of its memory map (the CPU's resident
    backend): row L * E + e is expert e of layer L, a contiguous uint8 tensor [record_size].

    Why not a copy: on the CPU the map already is host memory. A copy doubled the footprint
    (the H100 host's CPU-only run of Mixtral-8x7B at 2 bits peaked at 38.4 GB RSS for an
    18.5 GB file: the copy plus the page cache it was read through) and took seconds to load;
    the map costs nothing until an expert is used, and the kernel reads the page cache. Rows
    must never be written: the map is read-only (MoepackFile maps with mode "r")."""

    def __init__(self, file: MoepackFile):
        cfg, rs = file.config, file.header.expert_layout.record_size
        with warnings.catch_warnings():
            # torch has no read-only tensors and says so for a read-only array; nothing writes these
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.rows = [torch.from_numpy(file.expert_bytes(layer, e))
                         for layer in range(cfg.num_hidden_layers) for e in range(cfg.num_local_experts)]
        self.shape = (len(self.rows), rs)
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i]

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def load_records(file: MoepackFile, device: torch.device, progress: bool = True) -> torch.Tensor:
    """Every expert record of `file` as one uint8 tensor [L * E, record_size] on `device`
    (row L * E + e is expert e of layer L). On the CPU use MappedRecords instead: no copy."""
    cfg, rs = file.config, file.header.expert_layout.record_size
    L, E = cfg.num_hidden_layers, cfg.num_local_experts
    records = torch.empty((L * E, rs), dtype=torch.uint8, device=device)
    bar = tqdm(total=L * E * rs, unit="B", unit_scale=True, desc="loading experts",
                # a bar only for loads that take a while, and only on a terminal (None: tqdm checks)
                disable=True if not progress or L * E * rs < 256 << 20 else None)
    # one layer at a time through a pinned staging buffer: bounded host memory, one fast copy per layer
    stage = torch.empty((E, rs), dtype=torch.uint8, pin_memory=device.type == "cuda")
    for layer in range(L):
        for e in range(E):
            stage[e].numpy()[...] = file.expert_bytes(layer, e)
        records[layer * E : (layer + 1) * E].copy_(stage)
        bar.update(E * rs)
    bar.close()
    return records


class ResidentExperts:
    """All expert records on the compute device; each selected expert runs once for all
    the tokens routed to it.

    On CUDA one token's experts are found on the device (`routes_on_device`): the kernels
    read the router's choice from device memory (kernels.indexed_expert_ffn), so nothing
    waits for the host and the model can capture its whole decode step in one CUDA graph
    (runtime.step_graph). Otherwise the host reads the choice and replays a graph per
    expert (runtime.graphs)."""

    def __init__(self, file: MoepackFile, device: torch.device, dtype: torch.dtype, progress: bool = True,
                 cuda_graphs: bool | None = None, device_routing: bool | None = None):
        self.layout = file.header.expert_layout
        self.num_experts = file.config.num_local_experts
        self.device, self.dtype = torch.device(device), dtype
        # the CPU maps the file; device routing there is for tests under the Triton interpreter
        if self.device.type == "cpu" and not (device_routing and interpreting()):
            self.records = MappedRecords(file)  # [L * E] rows of record_size, views of the map
        else:
            self.records = load_records(file, self.device, progress)  # [L * E, record_size]
        x = torch.zeros(1, file.config.hidden_size, dtype=dtype)
        probe = x.to(self.device)
        can_route = (isinstance(self.records, torch.Tensor) and use_fused(probe)
                     and indexed_supported(self.records, self.layout, probe))
        if device_routing and not can_route:
            raise ConfigError("device routing needs the experts on a CUDA device with the fused kernels and "
                              "a layout they cover", hint="leave device_routing unset to choose automatically")
        self.routes_on_device = can_route if device_routing is None else device_routing
        # a prompt's experts dequantized a few per launch (kernels.grouped_prompt_ffn); 0: one by one
        self.prompt_chunk = prompt_chunk(self.records, self.layout, probe) if can_route else 0
        # host routing: decode steps replay one captured graph per expert (runtime.graphs); None: on CUDA
        self.graphs = None if self.routes_on_device else expert_graphs(
            self.records, self.layout, dtype, file.config.hidden_size, cuda_graphs)
        if len(self.records) and _cpu_kernel_applies(self.records[0], self.layout, x):
            # import numba and load (or compile) its kernels now, at load time, not inside the
            # first prefill
            expert_ffn(self.records[0], self.layout, x, dtype)
        self.reset_stats()

    def forward(self, layer: int, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            if self.routes_on_device:
                self.count(topk_idx.shape[1])
                return self.forward_routed(layer, x, topk_idx, topk_w)
            return self._decode_one(layer, x, topk_idx, topk_w)
        return self._prefill(layer, x, topk_idx, topk_w)

    def _prefill(self, layer: int, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        """Many tokens: the (token, choice) pairs grouped by expert with one sort and one host
        sync per layer (the group sizes), each expert run once on its rows. A sync per expert
        (torch.where) had kept the host from queueing ahead of the GPU."""
        # x: [T, H]; topk_idx, topk_w: [T, k]
        t, k = topk_idx.shape
        flat = topk_idx.reshape(-1)  # [T*k], pair p = token p // k, choice p % k
        order = torch.argsort(flat, stable=True)  # pairs grouped by expert, in token order within one
        counts = torch.bincount(flat, minlength=self.num_experts)  # [E]
        xs = x[order // k]  # [T*k, H]: each pair's token
        if self._grouped(xs):
            # every expert of the layer in two launches, the group offsets on the device: no sync
            offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            y = grouped_expert_ffn(self.records, layer * self.num_experts, offsets, xs.to(self.dtype), self.layout,
                                   max_rows=t).to(x.dtype)
            self._pending_counts.append(counts)  # read when stats() is
            self._tokens += t * k
        elif self.prompt_chunk:
            offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # queued before the sync below
            n = counts.tolist()  # the one host sync: each expert's rows are a matmul's shape
            y = grouped_prompt_ffn(self.records, layer * self.num_experts, n, offsets, xs.to(self.dtype), self.layout,
                                   self.prompt_chunk).to(x.dtype)
            self._evals += sum(1 for c in n if c)
            self._tokens += t * k
        else:
            ys, start = [], 0
            for e, n in enumerate(counts.tolist()):  # the one host sync
                if n:
                    ys.append(expert_ffn(self.records[layer * self.num_experts + e], self.layout, xs[start:start + n],
                                         self.dtype))
                    start += n
                    self._evals += 1
                    self._tokens += n
            y = torch.cat(ys)
        y = y * topk_w.reshape(-1)[order, None]  # [T*k, H], weighted
        # back to pair order, then each token's k choices summed: deterministic (an index_add
        # with repeated tokens runs atomics on CUDA, in no fixed order)
        pairs = torch.empty_like(y)
        pairs[order] = y
        return pairs.view(t, k, -1).sum(1)

    def _grouped(self, xs: torch.Tensor) -> bool:
        """Whether a prompt's experts run grouped (kernels.grouped_expert_ffn): the fused
        prefill is chosen (MOEPACK_PREFILL=fused) and the records are one device buffer the
        kernels read (the same condition as device routing)."""
        return self.routes_on_device and prefill_mode() == "fused" and xs.shape[0] > PREFILL_THRESHOLD

    def input_format(self, x: torch.Tensor, k: int):
        """The GEMV input format (kernels.qgemv.XFormat) forward_routed's first launch converts
        x [1, H] into for k experts, or None; see its `prepared`."""
        return indexed_input_format(self.layout, x.to(self.dtype), k)

    def forward_routed(self, layer: int, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor,
                       partials: bool = False, prepared: torch.Tensor | None = None) -> torch.Tensor:
        """One token (x [1, H]) with its experts chosen on the device: no host sync, so a
        CUDA graph may capture it (only when routes_on_device). Not counted in the stats:
        the caller counts (a replayed graph runs no Python). partials: the float32 partials
        [P, 1, H] of the w2 launch, unsummed (kernels.decode_ops sums them); prepared: x
        already in input_format (written by kernels.decode_ops.add_rms_norm)."""
        # topk_idx, topk_w: [1, k]: row numbers in this layer's block of records (a view: no
        # launch to offset the indices) and their weights
        rows = self.records[layer * self.num_experts:(layer + 1) * self.num_experts]
        y = indexed_expert_ffn(rows, topk_idx[0], topk_w[0], self.layout, x.to(self.dtype), keep_partials=partials,
                               prepared=prepared)
        return y if partials else y.to(x.dtype)

    def count(self, experts: int) -> None:
        """Count `experts` one-token expert calls."""
        self._evals += experts
        self._tokens += experts

    def _decode_one(self, layer: int, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        """One token: its k experts in turn, by graph replay where graphs were captured. The
        general path's unique / where / index_add cost ~60 us of host time per layer on
        dev-cpu, a tenth of a small model's decode step."""
        # x: [1, H]; topk_idx, topk_w: [1, k]
        if self.graphs is not None:
            self.graphs.set_input(x)
        out = None
        for j, e in enumerate(topk_idx[0].tolist()):  # the one host sync of the layer
            row = layer * self.num_experts + e
            if self.graphs is not None:
                y = self.graphs.run(row)  # [1, H]
            else:
                y = expert_ffn(self.records[row], self.layout, x, self.dtype)  # [1, H]
            w = topk_w[:, j:j + 1]  # [1, 1]
            # one launch per expert after the first (multiply-add in place): host time, not GPU
            # time, bounds a graphed decode step
            out = y * w if out is None else out.addcmul_(y, w)
        self.count(topk_idx.shape[1])
        return out.to(x.dtype)

    def stats(self) -> dict:
        if self._pending_counts:  # grouped prompts: how many experts had rows (one sync, here)
            self._evals += int(sum((c > 0).sum() for c in self._pending_counts))
            self._pending_counts.clear()
        return {
            "backend": "resident",
            "cuda_graphs": self.graphs is not None and self.graphs.capturing,  # per-expert graphs
            "routes_on_device": self.routes_on_device,
            "resident_bytes": self.records.numel(),
            "expert_evals": self._evals,
            "expert_tokens": self._tokens,
        }

    def reset_stats(self) -> None:
        self._evals = 0
        self._tokens = 0
        self._pending_counts: list[torch.Tensor] = []


def resident_experts(file: MoepackFile, model, device: torch.device, dtype: torch.dtype,
                     cuda_graphs: bool | None = None, device_routing: bool | None = None) -> ResidentExperts:
    """The default `expert_backend_factory` of runtime.loader.load_model (functools.partial
    it to pass cuda_graphs or device_routing)."""
    return ResidentExperts(file, device, dtype, cuda_graphs=cuda_graphs, device_routing=device_routing)
