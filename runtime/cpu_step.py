"""One-token decode on the CPU in one C call, layers to logits (runtime/csrc/decode_cpu.c).

Why: a CPU decode layer was ~45 torch ops and four kernel calls through ctypes, 0.6 ms of host
time per layer on dev-cpu whatever the model's size (BENCHMARKS.md section 23). For a small
model that is most of a token; for a CPU-only Mixtral on the GPU host's slower cores it is tens
of milliseconds of each token. The C loop runs the same arithmetic (float32) over the same
weights, KV cache and rotary tables the torch path uses: the prompt's prefill and any step the
C code declines run in torch, and both write the same cache.

Used by MixtralModel.forward for one-token steps where it applies (cpu_step_refusal): float32
on the CPU, the compiled kernel built, resident experts in CPU memory in a layout the kernel
takes, and attention projections it can multiply (packed, float32 or float16). MOEPACK_CPU_STEP=0
keeps the torch path (A/B timing, tests).
"""

from __future__ import annotations

import ctypes
import os

import torch

from .cpu_native import NativeKernel, expert_descriptor, matrix_descriptor
from .experts import ResidentExperts
from .qlinear import DenseLinear, HalfLinear, QuantLinear

ENV = "MOEPACK_CPU_STEP"
MAX_EXPERTS = 256  # decode_cpu.c's route keeps the probabilities on its stack

_p, _i64 = ctypes.c_void_p, ctypes.c_int64


class _Lin(ctypes.Structure):
    """decode_cpu.c's mp_lin."""

    _fields_ = [("kind", _i64), ("N", _i64), ("K", _i64), ("w", _p), ("desc", _p)]


class _Layer(ctypes.Structure):
    """decode_cpu.c's mp_dlayer."""

    _fields_ = [("in_norm", _p), ("post_norm", _p), ("qkv", _Lin * 3), ("o", _Lin), ("router", _p), ("kv", _p),
                ("experts", _p), ("window", _i64)]


class _Model(ctypes.Structure):
    """decode_cpu.c's mp_dmodel."""

    _fields_ = [("layers", _i64), ("H", _i64), ("heads", _i64), ("G", _i64), ("D", _i64), ("E", _i64), ("k", _i64),
                ("ctx", _i64), ("inter", _i64), ("eps", ctypes.c_double), ("cos", _p), ("sin", _p),
                ("expert_desc", _p), ("layer", _p), ("work", _p), ("final_norm", _p), ("lm_head", _Lin),
                ("times", _p)]


# decode_cpu.c's phases, in its order: what each step's time is split into (CpuStep.phase_ms)
PHASES = ("attention_in", "attend", "attention_out", "route", "experts", "head")


def _f32(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def _linear(m) -> tuple[tuple, list] | None:
    """((kind, N, K, w address, desc address), tensors to keep alive) for a projection the C
    code multiplies, else None."""
    if isinstance(m, DenseLinear) and _f32(m.weight):
        n, k = m.weight.shape
        return (2, n, k, m.weight.data_ptr(), None), [m.weight]
    if isinstance(m, HalfLinear) and m.weight16.is_contiguous() and m.weight16.device.type == "cpu":
        n, k = m.weight16.shape
        return (3, n, k, m.weight16.data_ptr(), None), [m.weight16]
    if isinstance(m, QuantLinear) and m.raw.device.type == "cpu" and m.raw.is_contiguous() and m.spec.quantized:
        desc = matrix_descriptor(m.shape, m.spec, 0)
        if desc is None:
            return None
        d = torch.tensor(desc, dtype=torch.int64)
        return (1, *m.shape, m.raw.data_ptr(), d.data_ptr()), [m.raw, d]
    return None


def _projections(attn) -> list:
    """The attention's q/k/v projections as the C code takes them: the stacked one, or three."""
    return [attn.qkv_proj] if attn.qkv_proj is not None else [attn.q_proj, attn.k_proj, attn.v_proj]


def cpu_step_refusal(model, kernel: NativeKernel | None) -> str | None:
    """None where CpuStep runs this model's one-token steps, else why not."""
    cfg, experts = model.config, model.experts
    if os.environ.get(ENV, "1") == "0":
        return f"{ENV}=0"
    if kernel is None or not hasattr(kernel, "decode_step"):
        return "no compiled CPU kernel"
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return "not float32 on the CPU"
    if not isinstance(experts, ResidentExperts) or experts.records.device.type != "cpu":
        return "experts not resident in CPU memory"
    if experts.graphs is not None:  # asked for (cuda_graphs=True): its eager stand-in's tests
        return "the experts replay graphs"
    if expert_descriptor(experts.layout) is None:  # None too for unquantized (fp16) experts
        return "an expert layout the compiled kernel does not take"
    if cfg.num_local_experts > MAX_EXPERTS or cfg.head_dim % 2:
        return "more than 256 experts, or an odd head_dim"
    rotary = model.layers[0].attn.rotary
    for layer in model.layers:
        a = layer.attn
        if any(_linear(m) is None for m in [*_projections(a), a.o_proj]):
            return f"layer {a.layer}: a projection the C code does not multiply"
        if a.rotary is not rotary or not all(_f32(t) for t in (layer.input_norm.weight, layer.post_attn_norm.weight,
                                                                 layer.moe.router)):
            return f"layer {a.layer}: weights not float32"
        if layer.input_norm.eps != model.layers[0].input_norm.eps or layer.post_attn_norm.eps != layer.input_norm.eps:
            return "RMSNorm eps differs between norms"
    if not _f32(model.norm.weight) or model.norm.eps != model.layers[0].input_norm.eps:
        return "the final norm: not float32, or another eps"
    return None


class CpuStep:
    """The C decode loop over one model's layers: the structs, filled once (every address is
    fixed until the model reallocates its context or changes its expert backend, which drop
    this object), and step()."""

    def __init__(self, model, kernel: NativeKernel):
        cfg, experts = model.config, model.experts
        self.model, self.experts, self.kernel = model, experts, kernel
        L, E = cfg.num_hidden_layers, cfg.num_local_experts
        first = model.layers[0].attn
        self._keep: list = []  # every tensor an address below points into
        self._desc = expert_descriptor(experts.layout)
        rows = [experts.records[i] for i in range(L * E)]
        self._addresses = torch.tensor([r.data_ptr() for r in rows], dtype=torch.int64)  # [L * E]
        self._keep += rows
        self._layers = (_Layer * L)()
        for i, (layer, ly) in enumerate(zip(model.layers, self._layers)):
            a = layer.attn
            for j, m in enumerate(_projections(a)):
                fields, keep = _linear(m)
                ly.qkv[j] = _Lin(*fields)
                self._keep += keep
            fields, keep = _linear(a.o_proj)
            ly.o = _Lin(*fields)
            self._keep += keep
            cache = model.cache.layers[i]  # [2, G, ctx, D]
            ly.in_norm, ly.post_norm = layer.input_norm.weight.data_ptr(), layer.post_attn_norm.weight.data_ptr()
            ly.router, ly.kv = layer.moe.router.data_ptr(), cache.data_ptr()
            ly.experts = self._addresses.data_ptr() + 8 * i * E
            ly.window = a.sliding_window or 0
            self._keep += [layer.input_norm.weight, layer.post_attn_norm.weight, layer.moe.router, cache]
        self._model = _Model(L, cfg.hidden_size, first.num_heads, first.num_kv_heads, first.head_dim, E,
                             cfg.num_experts_per_tok, model.max_ctx, experts.layout.matrix("w1").shape[0],
                             model.layers[0].input_norm.eps, first.rotary.cos.data_ptr(),
                             first.rotary.sin_signed.data_ptr(), self._desc.data_ptr(),
                             ctypes.addressof(self._layers), 0)
        self._keep += [first.rotary.cos, first.rotary.sin_signed, model.norm.weight]
        self._model.final_norm = model.norm.weight.data_ptr()
        head = _linear(model.lm_head)  # else the torch module multiplies the normed state
        if head is not None:
            self._model.lm_head = _Lin(*head[0])
            self._keep += head[1]
        self._vocab = head[0][1] if head is not None else None
        self._work = torch.empty(kernel.decode_work(ctypes.byref(self._model)), dtype=torch.float32)
        self._model.work = self._work.data_ptr()
        # seconds, summed over steps; a ctypes array, not a tensor: this object may be made in
        # inference mode, whose tensors refuse reset_times()'s in-place write outside it
        self._times = (ctypes.c_double * len(PHASES))()
        self._model.times = ctypes.addressof(self._times)
        self._timed_steps = 0
        self._chosen = torch.empty(L * cfg.num_experts_per_tok, dtype=torch.int64)
        self._model_ref = ctypes.byref(self._model)
        self.steps = 0

    def step(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor | None:
        """Logits [1, V] float32 of the one token `tokens` [1] at start_pos, or None where the
        C code declined (a non-finite activation): the caller runs the torch path, which writes
        the same cache positions again."""
        h = self.model.embed_tokens(tokens).clone()  # [1, H]: the C code writes it in place
        # a new tensor each step: callers keep logits (a buffer reused would change under them)
        logits = torch.empty((1, self._vocab), dtype=torch.float32) if self._vocab is not None else None
        rc = self.kernel.decode_step(self._model_ref, h.data_ptr(), start_pos, self._chosen.data_ptr(),
                                     None if logits is None else logits.data_ptr(), torch.get_num_threads())
        self._timed_steps += 1  # a declined step's phases up to its refusal are in the times too
        if rc != 0:
            return None
        self.steps += 1
        self.experts.count(self._chosen.numel())
        return logits if logits is not None else self.model.lm_head(h).float()  # h: the final norm's output

    def phase_ms(self) -> dict[str, float]:
        """Milliseconds per step run in C (declined ones included) in each phase (PHASES) since
        the last reset_times(), measured inside the C loop: attention_in is the input norm and
        the q/k/v GEMVs, attend the rotary, the cache write and attention over the cache,
        attention_out the o GEMV and its residual, route the norm and router, experts the chosen
        experts and their residual, head the final norm and the lm_head (when the C code applies
        it)."""
        n = max(self._timed_steps, 1)
        return {name: round(1e3 * v / n, 3) for name, v in zip(PHASES, self._times)}

    def reset_times(self) -> None:
        ctypes.memset(self._times, 0, ctypes.sizeof(self._times))
        self._timed_steps = 0
