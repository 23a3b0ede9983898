"""One expert's FFN, w2(silu(w1 x) * w3 x), straight from its packed record: for a few
tokens two launches (w1 and w3 fused with the gate, then w2), for many tokens dequantize
into a scratch buffer and dense matmuls."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from formats.errors import ConfigError
from formats.header import ExpertLayout
from formats.qtensor import QuantSpec

from ..dequant import _component_plan, component_tensors, typed_view
from .configs import GemvConfig, pick_gemv_config
from .prefill import Group, dequantize_words_into, prefill_matmul, prefill_mode, scratch
from .qgemv import (ACT_DTYPES, PREFILL_THRESHOLD, Index, XFormat, _check, codes_per_word, gemv, gemv_supported,
                    launch_plan, qmatmul, run_gemv, sm_count, unpermute_x, x_format)
from .words import word_layout_ok

# A view of one kernel operand inside the record: (dtype, itemsize, byte offset in the
# record, shape, strides).
_View = tuple[torch.dtype, int, int, tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class _DecodePlan:
    """What the two-launch decode path of one expert layout needs besides the tensors,
    computed once per layout (a value: never keyed by a record or its address).

    `views` are the distinct kernel operands of w1, w3, w2 (the low bit plane already as
    int32 words); `args[m]` picks the six pointer arguments of matrix m from them, exactly as
    qgemv._gemv_args would from component_tensors (unused ones repeat a used tensor)."""

    shape13: tuple[int, int]
    spec13: QuantSpec
    shape2: tuple[int, int]
    spec2: QuantSpec
    w2_per: int  # codes per word of w2: the order the gated kernel can write h in
    nbytes: int  # record bytes the three matrices span
    dtypes: tuple[tuple[torch.dtype, int], ...]  # typed views of the record the operands use
    views: tuple[_View, ...]
    args: tuple[tuple[int, ...], ...]


@lru_cache(maxsize=64)
def _decode_plan(layout: ExpertLayout) -> _DecodePlan | None:
    """The plan, or None when this layout takes the general path (w1 and w3 not alike, a
    layout the fused GEMV does not cover, or an operand not 4-byte aligned in the record)."""
    m1, m3, m2 = layout.matrix("w1"), layout.matrix("w3"), layout.matrix("w2")
    if not (m1.spec == m3.spec and m1.shape == m3.shape and m1.spec.quantized and m2.spec.quantized
            and gemv_supported(m1.shape, m1.spec) and gemv_supported(m2.shape, m2.spec)):
        return None
    views: list[_View] = []
    args, dtypes, nbytes = [], {}, 0
    for m in (m1, m3, m2):
        plan, end = _component_plan(tuple(m.shape), m.spec)
        nbytes = max(nbytes, m.offset + end)
        index = {}
        for name, dtype, itemsize, off, shape, strides in plan:
            off += m.offset
            if name in ("q", "q_hi"):  # bit planes: int32 words / int16 half-words, as words.word_view
                size = 4 if name == "q" else 2
                if off % size or shape[1] % size:
                    return None
                dtype, itemsize = (torch.int32 if size == 4 else torch.int16), size
                shape, strides = (shape[0], shape[1] // size), (shape[1] // size, 1)
            if off % 4:  # the runtime check below is then one test on the record
                return None
            dtypes[dtype] = itemsize
            index[name] = len(views)
            views.append((dtype, itemsize, off, shape, strides))
        q, s, z = index["q"], index["scale"], index["zero"]
        args.append((q, index.get("q_hi", q), s, index.get("scale_meta", s), z, index.get("zero_meta", z)))
    return _DecodePlan(tuple(m1.shape), m1.spec, tuple(m2.shape), m2.spec, codes_per_word(m2.spec), nbytes,
                       tuple(dtypes.items()), tuple(views), tuple(args))


def _operands(record: torch.Tensor, plan: _DecodePlan) -> tuple[list, list, list]:
    """The six kernel pointer arguments of w1, w3 and w2 inside `record` (one as_strided
    call per operand)."""
    so = record.storage_offset()
    typed = {dtype: typed_view(record, dtype, itemsize) for dtype, itemsize in plan.dtypes}
    ops = [typed[dtype].as_strided(shape, strides, (so + off) // itemsize)
           for dtype, itemsize, off, shape, strides in plan.views]
    a1, a3, a2 = ([ops[i] for i in a] for a in plan.args)
    return a1, a3, a2


def _usable(record: torch.Tensor, plan: _DecodePlan, x: torch.Tensor) -> bool:
    """Whether the planned views fit `record` and x suits the kernels (else the general
    path runs, and raises the errors for bad inputs)."""
    return (record.dtype == torch.uint8 and record.dim() == 1 and record.numel() >= plan.nbytes
            and record.storage_offset() % 4 == 0 and record.data_ptr() % 4 == 0 and x.shape[-1] == plan.shape13[1]
            and x.dtype in ACT_DTYPES and record.device == x.device)


def _launches(plan: _DecodePlan, ops: tuple[list, list, list], x: torch.Tensor, configs: dict[str, GemvConfig],
              index: Index | None = None, keep_partials: bool = False,
              prepared: torch.Tensor | None = None) -> torch.Tensor:
    """The two launches of the few-token path: w1 and w3 with the gate, writing h in the format
    w2's kernel reads (permuted, or its int16 activations where the gated launch's row blocks
    hold whole words: no launch in between), then w2. Indexed (`index`): over the token's
    experts, see qgemv.run_gemv."""
    a1, a3, a2 = ops
    experts = 0 if index is None else index.sel.shape[0]
    # resolved per call, not cached in the plan: the TUNED table may change
    cfg2 = configs.get("w2") or pick_gemv_config(*plan.shape2, x.shape[0], plan.spec2, sm_count=sm_count(x.device))
    out_per = plan.w2_per if cfg2.permute_x else 1
    plan2 = launch_plan(x, plan.shape2, plan.spec2, False, cfg2, x_permuted=out_per > 1, experts=experts)
    plan13 = launch_plan(x, plan.shape13, plan.spec13, True, configs.get("w13"), out_per=out_per, experts=experts,
                         out_int=plan2.per if plan2.int_x else 0)
    h = run_gemv(x, [a1, a3], plan13, index, prepared=prepared)
    if plan13.out_int:
        return run_gemv(None, [a2], plan2, index, keep_partials, prepared=h, dtype=x.dtype)
    return run_gemv(h, [a2], plan2, index, keep_partials)


def _decode(record: torch.Tensor, layout: ExpertLayout, x: torch.Tensor,
            configs: dict[str, GemvConfig]) -> torch.Tensor | None:
    """The few-token path with its host work cut to the launches and one as_strided call
    per operand: the same kernel arguments as the general path below, or None where that
    path must run (it also raises the errors for bad inputs)."""
    plan = _decode_plan(layout)
    if plan is None or x.dim() != 2 or not _usable(record, plan, x):
        return None
    return _launches(plan, _operands(record, plan), x, configs)


# The most scratch grouped_prompt_ffn dequantizes a layer's experts into at once: four
# Mixtral-8x7B experts' w1 and w3 in float16 (235 MB each), so a layer takes two launches
# per matrix kind instead of one per expert and matrix.
PROMPT_SCRATCH_BYTES = 1 << 30


def _gated(x: torch.Tensor, w13: torch.Tensor, i: int) -> torch.Tensor:
    """silu(w1 x) * w3 x [T, I] (a view, rows 2I apart) for x [T, H] and w1 over w3 stacked
    in w13 [2I, H]: one matmul, the gate in place on its output."""
    y = F.linear(x, w13)  # [T, 2I]
    return F.silu(y[:, :i], inplace=True).mul_(y[:, i:])


def _pair_delta(layout: ExpertLayout, plan: _DecodePlan) -> int | None:
    """Bytes from w1's operands to w3's (dequant_words_kernel's DELTA), or None where the word
    kernel cannot dequantize this layout."""
    delta = layout.matrix("w3").offset - layout.matrix("w1").offset
    ok = delta % 4 == 0 and word_layout_ok(plan.shape13, plan.spec13) and word_layout_ok(plan.shape2, plan.spec2)
    return delta if ok else None


def prompt_chunk(records: torch.Tensor, layout: ExpertLayout, x: torch.Tensor) -> int:
    """How many experts grouped_prompt_ffn dequantizes per launch for `records` ([rows,
    record_size] uint8, contiguous) and activations like x, within PROMPT_SCRATCH_BYTES
    (at least one); 0 where it cannot run (the per-expert path then does)."""
    plan = _decode_plan(layout)
    if not indexed_supported(records, layout, x) or _pair_delta(layout, plan) is None:
        return 0
    i, h = plan.shape13
    return prompt_chunk_experts(i, h, x.element_size())


def prompt_chunk_experts(inter: int, hidden: int, dtype_bytes: int) -> int:
    """Experts whose w1 and w3 fit PROMPT_SCRATCH_BYTES together in the compute dtype (at
    least one): prompt_chunk's count, and what the memory plan reserves for it."""
    return max(1, PROMPT_SCRATCH_BYTES // (2 * inter * hidden * dtype_bytes))


def grouped_prompt_ffn(records: torch.Tensor, row0: int, counts: list[int], offsets: torch.Tensor, xs: torch.Tensor,
                       layout: ExpertLayout, chunk: int) -> torch.Tensor:
    """A layer's experts over a prompt, dequantized `chunk` experts per launch: rows
    offsets[e] .. offsets[e+1] of xs [R, H] (sorted by expert; counts[e] of them, read on
    the host) go through the FFN of record row0 + e of `records`. Per chunk, one launch
    writes every chosen expert's w1 and w3 into the scratch, each expert takes one matmul
    and the gate in place, one launch overwrites the scratch with their w2 (the stream runs
    it after those matmuls), and one matmul each writes its rows of the result. The same
    arithmetic as _prompt, with two launches per chunk where that makes two per expert:
    each Triton launch costs the host tens of microseconds (section 6 of BENCHMARKS.md
    measured ~110 us on the H100 host). The caller checks prompt_chunk first.
    -> [R, H] in xs.dtype."""
    plan = _decode_plan(layout)
    a1, _, a2 = _operands(records[0], plan)
    delta = _pair_delta(layout, plan)
    (i, h), (n2, k2) = plan.shape13, plan.shape2
    out = torch.empty((xs.shape[0], n2), dtype=xs.dtype, device=xs.device)
    w = scratch(xs.device, xs.dtype, min(chunk, len(counts)) * 2 * i * h)
    start = 0
    for c0 in range(0, len(counts), chunk):
        part = counts[c0:c0 + chunk]
        if not any(part):
            continue
        group = Group(offsets[c0:], row0 + c0, records.stride(0), len(part))
        w13 = dequantize_words_into(a1, plan.shape13, plan.spec13, w[: len(part) * 2 * i * h].view(-1, h),
                                    mats=2, delta=delta, group=group)  # [experts * 2I, H]
        gates = []
        for j, n in enumerate(part):
            if n:
                gates.append((j, _gated(xs[start:start + n], w13[j * 2 * i:(j + 1) * 2 * i], i), start))
                start += n
        w2 = dequantize_words_into(a2, plan.shape2, plan.spec2, w[: len(part) * n2 * k2].view(-1, k2),
                                   group=group)  # [experts * H, I]
        for j, g, s in gates:
            torch.matmul(g, w2[j * n2:(j + 1) * n2].t(), out=out[s:s + g.shape[0]])
    return out


def _prompt(record: torch.Tensor, layout: ExpertLayout, x: torch.Tensor, pair: bool) -> torch.Tensor | None:
    """The many-token path with its host work cut to the launches and one as_strided call per
    operand (the general path below also built ~15 component views per expert: ~235 against
    ~160 us of host time per expert on dev-cpu, tools/prefill_host.py). pair: w1 and w3
    dequantized by one launch into one [2I, H] scratch matrix and multiplied by one matmul
    (two Triton launches and four torch kernels per expert), else each in turn through a
    one-matrix scratch (three and five: what a memory plan that counts one matrix allows).
    The gate runs in place; w2 then overwrites the scratch (the stream orders it after the
    matmuls that read it). None where the general path must run."""
    plan = _decode_plan(layout)
    if plan is None or x.dim() != 2 or not _usable(record, plan, x):
        return None
    delta = _pair_delta(layout, plan)
    if delta is None:
        return None
    a1, a3, a2 = _operands(record, plan)
    (i, h), (n2, k2) = plan.shape13, plan.shape2
    w = scratch(x.device, x.dtype, (2 if pair else 1) * i * h)
    if pair:
        g = _gated(x, dequantize_words_into(a1, plan.shape13, plan.spec13, w.view(2 * i, h), mats=2, delta=delta), i)
    else:
        g = F.silu(F.linear(x, dequantize_words_into(a1, plan.shape13, plan.spec13, w.view(i, h))), inplace=True)
        g.mul_(F.linear(x, dequantize_words_into(a3, plan.shape13, plan.spec13, w.view(i, h))))
    return F.linear(g, dequantize_words_into(a2, plan.shape2, plan.spec2, w[: n2 * k2].view(n2, k2)))


def indexed_supported(records: torch.Tensor, layout: ExpertLayout, x: torch.Tensor) -> bool:
    """Whether indexed_expert_ffn can run the experts of `records` ([rows, record_size] uint8,
    contiguous) for activations like x."""
    plan = _decode_plan(layout)
    return (plan is not None and records.dim() == 2 and records.is_contiguous() and records.shape[0] > 0
            and records.shape[1] % 4 == 0 and _usable(records[0], plan, x))


def indexed_expert_ffn(records: torch.Tensor, sel: torch.Tensor, w: torch.Tensor, layout: ExpertLayout,
                       x: torch.Tensor, configs: dict[str, GemvConfig] | None = None,
                       keep_partials: bool = False, prepared: torch.Tensor | None = None) -> torch.Tensor:
    """sum over e of w[e] * FFN of records[sel[e]] applied to x: one token's MoE output with
    its experts chosen on the device (sel [E] int64 rows of `records` [rows, record_size]
    uint8, w [E] router weights, x [T, H]) -> [T, H] in x.dtype. Two launches over all E
    experts and one sum; nothing waits for the host, so a CUDA graph can hold the whole step.
    Each expert's gated intermediate is multiplied by its router weight (w2 is linear, so its
    output carries the weight). The caller checks indexed_supported first. keep_partials:
    w2's float32 partials [P, T, H] unsummed (qgemv.run_gemv), for kernels.decode_ops;
    prepared: x in indexed_input_format (qgemv.run_gemv)."""
    plan = _decode_plan(layout)
    return _launches(plan, _operands(records[0], plan), x, configs or {}, Index(sel, w, records.stride(0)),
                     keep_partials, prepared)


def indexed_input_format(layout: ExpertLayout, x: torch.Tensor, experts: int,
                         configs: dict[str, GemvConfig] | None = None) -> XFormat | None:
    """The format indexed_expert_ffn's first launch (w1 and w3) converts x [T, H] into before
    it runs (qgemv.x_format), or None: a producer that writes it saves that launch."""
    plan = _decode_plan(layout)
    if plan is None:
        return None
    return x_format(launch_plan(x, plan.shape13, plan.spec13, True, (configs or {}).get("w13"), experts=experts))


def grouped_expert_ffn(records: torch.Tensor, row0: int, offsets: torch.Tensor, xs: torch.Tensor,
                       layout: ExpertLayout, max_rows: int) -> torch.Tensor:
    """A layer's experts over a prompt in two launches (kernels/triton_gemm.py, GROUPED): rows
    offsets[e] .. offsets[e+1] of xs [R, H] (sorted by expert) go through the FFN of record
    row0 + e of `records` [rows, record_size]; max_rows bounds any expert's row count (the
    prompt's tokens). offsets [E + 1] int64 stays on the device: nothing waits for the host.
    -> [R, H] in xs.dtype. The caller checks indexed_supported first."""
    from .prefill import GEMM_CONFIG, gemm_constexprs
    from .triton_gemm import qgemm_kernel  # triton only when a kernel runs

    plan = _decode_plan(layout)
    a1, a3, a2 = _operands(records[0], plan)
    e = offsets.numel() - 1
    bm, bn = GEMM_CONFIG[:2]
    rs = records.stride(0)
    (i, h), (n2, _) = plan.shape13, plan.shape2
    mid = torch.empty((xs.shape[0], i), dtype=xs.dtype, device=xs.device)  # silu(w1 x) * w3 x
    qgemm_kernel[(-(-max_rows // bm), -(-i // bn), e)](
        xs, mid, *a1, *a3, offsets, row0, rs, max_rows, i, h, xs.stride(0), mid.stride(0),
        GATED=True, GROUPED=True, **gemm_constexprs(plan.shape13, plan.spec13, xs.dtype))
    out = torch.empty((xs.shape[0], n2), dtype=xs.dtype, device=xs.device)
    qgemm_kernel[(-(-max_rows // bm), -(-n2 // bn), e)](
        mid, out, *a2, *a2, offsets, row0, rs, max_rows, n2, i, mid.stride(0), out.stride(0),
        GROUPED=True, **gemm_constexprs(plan.shape2, plan.spec2, xs.dtype))
    return out


def fused_expert_ffn(record: torch.Tensor, layout: ExpertLayout, x: torch.Tensor, *,
                     prefill_threshold: int = PREFILL_THRESHOLD,
                     configs: dict[str, GemvConfig] | None = None, prompt_pair: bool = True) -> torch.Tensor:
    """x [T, H] (float16/bfloat16/float32, on the record's device) -> [T, H] in x.dtype.

    `configs` may override the GEMV launch of "w13" (the fused gate) and "w2". prompt_pair
    False: many tokens dequantize one matrix at a time (a scratch of one matrix, as the
    offloading engine's memory plan counts it; see _prompt)."""
    if x.dim() != 2:
        raise ConfigError(f"fused_expert_ffn takes x of shape [T, H], got {list(x.shape)}")
    configs = configs or {}
    t = x.shape[0]
    if 0 < t <= prefill_threshold:
        y = _decode(record, layout, x, configs)
        if y is not None:
            return y
    elif t > prefill_threshold and prefill_mode() == "dequant":
        y = _prompt(record, layout, x, prompt_pair)
        if y is not None:
            return y
    # the general path: every layout, the prefill, and the errors
    m1, m3, m2 = layout.matrix("w1"), layout.matrix("w3"), layout.matrix("w2")
    c1, c3, c2 = (component_tensors(record, m.shape, m.spec, base=m.offset) for m in (m1, m3, m2))
    _check(x, c1, m1.shape, m1.spec)
    if t > prefill_threshold:
        # intermediate in x.dtype, as runtime.experts.expert_ffn computes it
        h = F.silu(prefill_matmul(x, c1, m1.shape, m1.spec)) * prefill_matmul(x, c3, m3.shape, m3.spec)
        return prefill_matmul(h, c2, m2.shape, m2.spec)
    w2_fused = m2.spec.quantized and gemv_supported(m2.shape, m2.spec)
    cfg2 = configs.get("w2") or pick_gemv_config(*m2.shape, t, m2.spec, sm_count=sm_count(x.device))
    # the gated kernel can write h in the order w2's kernel reads it: no copy in between
    out_per = codes_per_word(m2.spec) if w2_fused and cfg2.permute_x else 1
    h = None
    if m1.spec == m3.spec and m1.shape == m3.shape and m1.spec.quantized:
        h = gemv(x, [c1, c3], m1.shape, m1.spec, configs.get("w13"), out_per=out_per)  # [T, I], one launch
    if h is None:
        out_per = 1
        h = F.silu(qmatmul(x, c1, m1.shape, m1.spec, prefill_threshold=prefill_threshold)) * qmatmul(
            x, c3, m3.shape, m3.spec, prefill_threshold=prefill_threshold)
    if w2_fused:
        y = gemv(h, [c2], m2.shape, m2.spec, cfg2, x_permuted=out_per > 1)
        if y is not None:
            return y
        if out_per > 1:
            h = unpermute_x(h, out_per)
    return qmatmul(h, c2, m2.shape, m2.spec, prefill_threshold=prefill_threshold)
