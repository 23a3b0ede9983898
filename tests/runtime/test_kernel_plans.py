"""The memoized launch plans of the fused kernels' wrappers (runtime/kernels/qgemv.py,
expert.py, configs.py) and runtime.dequant.component_tensors launch exactly what the plain
per-call computation does: the Triton launch is replaced by a recorder and its arguments
are compared with a straight re-statement of the launch arithmetic (no GPU, no interpreter).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from formats.errors import LayoutError
from formats.header import ExpertLayout, MatrixLayout
from formats.qtensor import QuantSpec, matrix_layout
from formats.spec import ALIGNMENT, COMPONENT_ALIGNMENT, align_up
from runtime.dequant import TORCH_DTYPES, component_tensors
from runtime.kernels import configs, expert, qgemv, words
from runtime.kernels.configs import GemvConfig, pick_gemv_config, register_config

pytest.importorskip("triton")


class Recorder:
    """Stands in for qgemv_kernel: keeps (grid, args, kwargs) of every launch."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


@pytest.fixture
def launches(monkeypatch):
    """The GEMV launches of the float path (the heuristic's int16 path first quantizes x with a
    launch of its own: test_int16_launch_quantizes_x_first)."""
    from runtime.kernels import triton_gemv

    monkeypatch.setenv(configs.INT_X_ENV, "0")
    rec = Recorder()
    monkeypatch.setattr(triton_gemv, "qgemv_kernel", rec)
    return rec.calls


def describe(v):
    """A launch argument as what the kernel sees of it (tensors: where, what, how laid out)."""
    if isinstance(v, torch.Tensor):
        return ("tensor", v.dtype, tuple(v.shape), v.stride(), v.data_ptr(), v.device)
    return v


def described(calls):
    """The launches as comparable values: the activations and outputs (fresh tensors each
    call) and the index pointers (unused, not indexed: the activations again) by layout only,
    the packed operands by address too."""
    return [(grid, [describe(a)[:4] for a in args[:3]] + [describe(a) for a in args[3:15]]
             + [describe(a)[:4] for a in args[15:17]] + [describe(a) for a in args[17:]], kwargs)
            for grid, args, kwargs in calls]


def slow_component_tensors(buf, shape, spec, base=0):
    """component_tensors as it was: slice, dtype view, shape view per component."""
    comps, _ = matrix_layout(tuple(shape), spec)
    return {c.name: buf[base + c.offset: base + c.offset + c.nbytes].view(TORCH_DTYPES[c.dtype]).view(c.shape)
            for c in comps}


def reference_launch(x, mats, shape, spec, config=None, *, x_permuted=False, out_per=1):
    """The arguments qgemv.gemv launched with before its plans were memoized (the same
    arithmetic, evaluated on every call)."""
    args = [words.operand_args(c) for c in mats]
    gated = len(mats) == 2
    n, k = shape
    t = x.shape[0]
    cfg = (config or pick_gemv_config(n, k, t, spec, gated, qgemv.sm_count(x.device))).for_matrix(k, spec)
    per = qgemv.codes_per_word(spec)
    if cfg.permute_x and not x_permuted:
        x = qgemv.permute_x(x, per)
    elif x_permuted and not cfg.permute_x:
        x = qgemv.unpermute_x(x, per)
    tiles = -(-(-(-k // cfg.block_k)) // cfg.split_k)
    split = -(-k // (tiles * cfg.block_k))
    partial = split > 1
    b = args[1] if gated else args[0]
    grid = (-(-n // cfg.block_n), split)
    ints = (n, 0, x.stride(0), 0, t * n, t * n, n)  # not indexed: no record stride, one expert
    kwargs = dict(K=k, MG=max(spec.meta_group_size, 1), TILES=tiles, T=t, BT=1 << max(0, (t - 1).bit_length()), BITS=spec.bits, G=spec.group_size,
                  MB=spec.meta_bits, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, X_PERMUTED=cfg.permute_x,
                  GATED=gated, PARTIAL=partial, OUT_PER=1 if partial else out_per, OUT_INT=0,
                  EVEN=n % cfg.block_n == 0 and split * tiles * cfg.block_k == k,
                  ROW_META=spec.coded_meta and cfg.block_k % spec.group_size == 0 and k % cfg.block_k == 0
                  and spec.meta_group_size % (cfg.block_k // spec.group_size) == 0, INDEXED=False, SCALED=False,
                  INT_X=False, ASM=False, num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True)
    out_shape = (split, t, n) if partial else (t, n)
    return grid, [describe(a) for a in (*args[0], *b)], ints, kwargs, out_shape, x


def check_launch(call, ref, t):
    grid, args, kwargs = call
    rgrid, rptrs, rints, rkwargs, out_shape, xr = ref
    assert grid == rgrid and kwargs == rkwargs
    got = [describe(a) for a in args]
    assert got[3:15] == rptrs  # the packed matrices
    assert got[17:] == list(rints)  # after the index's two (unused) pointers
    x, out, out2 = args[:3]
    assert torch.equal(x, xr) and x.is_contiguous() and x.stride() == xr.stride()
    assert tuple(out.shape) == out_shape and tuple(out2.shape) == out_shape
    assert out.dtype == (torch.float32 if kwargs["PARTIAL"] else x.dtype)
    assert (out2 is out) == (not (kwargs["GATED"] and kwargs["PARTIAL"]))


def packed_buffer(shapes_specs, gen):
    total = sum(matrix_layout(s, sp)[1] for s, sp in shapes_specs) + 64 * len(shapes_specs)
    return torch.randint(0, 256, (total,), dtype=torch.uint8, generator=gen)


SPECS = [QuantSpec(2, 16, 8, 128), QuantSpec(3, 64, 16), QuantSpec(4, 64, 16), QuantSpec(8, 32, 8, 24)]
GEMV_CASES = [
    (spec, shape, t, cfg, x_permuted, out_per)
    for spec in SPECS
    for shape in ((4096, 1024), (96, 256))
    for t in (1, 3)
    for cfg in (None, GemvConfig(block_n=16, block_k=128, split_k=2), GemvConfig(block_n=8, block_k=64, permute_x=False))
    for x_permuted, out_per in ((False, 1), (True, 1), (False, 16))
]


@pytest.mark.parametrize("gated", [False, True])
def test_gemv_launches_what_the_plain_computation_does(launches, gated):
    gen = torch.Generator().manual_seed(0)
    for spec, shape, t, cfg, x_permuted, out_per in GEMV_CASES:
        mats = [component_tensors(packed_buffer([(shape, spec)], gen), shape, spec) for _ in range(1 + gated)]
        x = torch.randn(t, shape[1], generator=gen)
        for _ in range(2):  # the first call fills the caches, the second reads them
            launches.clear()
            y = qgemv.gemv(x, mats, shape, spec, cfg, x_permuted=x_permuted, out_per=out_per)
            assert y is not None and y.shape == (t, shape[0])
            assert len(launches) == 1
            check_launch(launches[0], reference_launch(x, mats, shape, spec, cfg, x_permuted=x_permuted,
                                                       out_per=out_per), t)


def test_int16_launch_quantizes_x_first(monkeypatch):
    """An int_x launch: xquant_kernel over x's rows and word blocks writes one int32 buffer,
    and qgemv_kernel reads that buffer with its row stride, INT_X set and no float x order."""
    from runtime.kernels import triton_gemv

    gemv_rec, quant_rec = Recorder(), Recorder()
    monkeypatch.setattr(triton_gemv, "qgemv_kernel", gemv_rec)
    monkeypatch.setattr(triton_gemv, "xquant_kernel", quant_rec)
    shape, spec = (64, 512), QuantSpec(2, 16, 8, 128)
    buf = packed_buffer([(shape, spec)], torch.Generator().manual_seed(0))
    comps = component_tensors(buf, shape, spec)
    x = torch.randn(3, 512)
    qgemv.gemv(x, [comps], shape, spec, GemvConfig(block_n=16, block_k=256, int_x=True))
    (qgrid, qargs, qkw), = quant_rec.calls
    (grid, args, kw), = gemv_rec.calls
    kw_words = 512 // 16
    assert qgrid == (3, 1) and qkw == dict(BITS=2, BW=32, enable_fp_fusion=True)
    assert torch.equal(qargs[0], x) and qargs[2:] == (512, 512)
    xq = qargs[1]
    assert xq.dtype == torch.int32 and tuple(xq.shape) == (3, 8 + 2, kw_words)
    assert args[0].data_ptr() == xq.data_ptr() and tuple(args[0].shape) == (3, 10 * kw_words)
    assert args[17 + 2] == 10 * kw_words  # stride_xt (after N, RS): a token's pairs, scales and sums
    assert kw["INT_X"] and not kw["X_PERMUTED"] and not kw["ASM"]  # ASM only where compiled
    assert args[1].dtype == x.dtype  # the result keeps the activations' dtype


def test_qmatmul_keeps_leading_dimensions(launches):
    shape, spec = (64, 256), QuantSpec(4, 64, 16)
    comps = component_tensors(packed_buffer([(shape, spec)], torch.Generator().manual_seed(1)), shape, spec)
    for lead in ((1,), (3,), (2, 3)):
        launches.clear()
        x = torch.randn(*lead, shape[1])
        y = qgemv.qmatmul(x, comps, shape, spec)
        assert y.shape == (*lead, shape[0])
        check_launch(launches[0], reference_launch(x.reshape(-1, shape[1]), [comps], shape, spec), x.numel() // shape[1])
        assert y.dtype == x.dtype


@pytest.mark.parametrize("per", [4, 8, 16])
def test_permute_x_matches_view_transpose(per):
    big = torch.randn(5, 3 * 256)
    for x in (big[:, 256:512], big[1:4, :256], big[:1, 512:], torch.randn(256).expand(2, 256)):
        t, k = x.shape
        ref = x.reshape(t, k // per, per).transpose(1, 2).reshape(t, k)
        assert torch.equal(qgemv.permute_x(x, per), ref)
        assert torch.equal(qgemv.unpermute_x(ref, per), x)
        assert torch.equal(qgemv.unpermute_x(qgemv.permute_x(x, per)[:, :], per), x)


def test_out_per_error_is_raised_every_call(launches):
    shape, spec = (40, 256), QuantSpec(4, 64, 16)
    comps = component_tensors(packed_buffer([(shape, spec)], torch.Generator().manual_seed(2)), shape, spec)
    for _ in range(2):  # not swallowed by the plan cache
        with pytest.raises(LayoutError, match="cannot permute a 40-row result"):
            qgemv.gemv(torch.randn(1, 256), [comps], shape, spec, out_per=16)


def test_registered_config_is_seen_after_cached_picks(monkeypatch):
    spec = QuantSpec(2, 16, 8, 128)
    monkeypatch.setattr(configs, "TUNED", {})
    before = pick_gemv_config(4096, 14336, 1, spec)
    assert pick_gemv_config(4096, 14336, 1, spec) == before
    tuned = GemvConfig(block_n=64, block_k=256, split_k=2, num_warps=8)
    register_config(4096, 14336, 1, spec, False, tuned)
    assert pick_gemv_config(4096, 14336, 1, spec) == tuned.for_matrix(14336, spec) != before


def test_4bit_meta_borrows_the_8bit_meta_tuning(monkeypatch):
    monkeypatch.setattr(configs, "TUNED", {})
    spec8, spec4 = QuantSpec(2, 16, 8, 128), QuantSpec(2, 16, 4, 128)
    tuned = GemvConfig(block_n=64, block_k=256, split_k=2, num_warps=8)
    register_config(4096, 14336, 1, spec8, False, tuned)
    assert pick_gemv_config(4096, 14336, 1, spec4) == tuned.for_matrix(14336, spec4)
    own = GemvConfig(block_n=16, block_k=512)
    register_config(4096, 14336, 1, spec4, False, own)
    assert pick_gemv_config(4096, 14336, 1, spec4) == own.for_matrix(14336, spec4)


def test_for_matrix_memo_matches_arithmetic():
    spec = QuantSpec(4, 32, 8, 256)
    assert GemvConfig(block_n=16, block_k=1024, split_k=64).for_matrix(96, spec) == GemvConfig(
        block_n=16, block_k=128, split_k=1)
    assert GemvConfig(block_k=32, split_k=3).for_matrix(128, spec).split_k == 2


# ------------------------------------------------------------------ component_tensors

@pytest.mark.parametrize("spec", SPECS + [QuantSpec(16)], ids=lambda s: s.describe().replace(" ", "_"))
@pytest.mark.parametrize("lead", [0, 64, 3])  # 3: a buffer not aligned in its storage
def test_component_tensors_match_slices(spec, lead):
    shape = (48, 128)
    gen = torch.Generator().manual_seed(3)
    nbytes = matrix_layout(shape, spec)[1]
    storage = torch.randint(0, 256, (lead + 128 + nbytes + 5,), dtype=torch.uint8, generator=gen)
    buf = storage[lead:]
    for base in (0, 128):
        if lead % 4:
            # float components of a misaligned buffer: both ways refuse or give the same views
            try:
                ref = slow_component_tensors(buf, shape, spec, base)
            except RuntimeError:
                with pytest.raises(LayoutError, match="misaligned"):
                    component_tensors(buf, shape, spec, base)
                continue
        else:
            ref = slow_component_tensors(buf, shape, spec, base)
        got = component_tensors(buf, shape, spec, base)
        assert list(got) == list(ref)
        for name in ref:
            assert describe(got[name]) == describe(ref[name]), name
            assert got[name].storage_offset() == ref[name].storage_offset()  # same bytes, seen alike


# ------------------------------------------------------------------ one expert

def layout_of(hidden, inter, spec13, spec2=None):
    mats, offset = [], 0
    for name, shape, spec in (("w1", (inter, hidden), spec13), ("w3", (inter, hidden), spec13),
                              ("w2", (hidden, inter), spec2 or spec13)):
        mats.append(MatrixLayout(name, shape, spec, offset))
        offset = align_up(offset + mats[-1].nbytes, COMPONENT_ALIGNMENT)
    return ExpertLayout(align_up(offset, ALIGNMENT), tuple(mats))


EXPERT_CASES = [
    (layout_of(4096, 14336, QuantSpec(2, 16, 8, 128)), 1, None),
    (layout_of(4096, 14336, QuantSpec(2, 16, 8, 128)), 4, None),
    (layout_of(256, 512, QuantSpec(3, 64, 8, 128), QuantSpec(4, 32, 16)), 2, None),
    (layout_of(256, 512, QuantSpec(8, 32, 16)), 3, {"w2": GemvConfig(16, 64, split_k=2, permute_x=False)}),
    (layout_of(256, 512, QuantSpec(4, 64, 16)), 1, {"w13": GemvConfig(16, 64, split_k=2)}),
]


@pytest.mark.parametrize("layout,tokens,cfgs", EXPERT_CASES)
def test_fused_expert_decode_plan_launches_what_the_general_path_does(launches, monkeypatch, layout, tokens, cfgs):
    """The per-layout plan (one as_strided view per operand) against the general path
    (component_tensors per matrix, then qgemv.gemv), which the plan must reproduce."""
    gen = torch.Generator().manual_seed(4)
    record = torch.randint(0, 256, (layout.record_size + 4096,), dtype=torch.uint8, generator=gen)[4096:]
    x = torch.randn(tokens, layout.matrix("w1").shape[1], generator=gen)
    assert expert._decode(record, layout, x, cfgs or {}) is not None  # the plan's path, not the fallback
    launches.clear()
    fast = [expert.fused_expert_ffn(record, layout, x, configs=cfgs) for _ in range(2)]
    fast_calls = described(launches)
    launches.clear()
    monkeypatch.setattr(expert, "_decode", lambda *a: None)
    slow = expert.fused_expert_ffn(record, layout, x, configs=cfgs)
    assert len(launches) == 2 and fast_calls == described(launches) * 2
    (_, first, kw1), (_, second, _) = launches
    if not kw1["PARTIAL"] and kw1["OUT_PER"] > 1:  # h written in the order w2 reads it: no copy between
        assert second[0].data_ptr() == first[1].data_ptr()
    for y in fast:
        assert y.shape == slow.shape == x.shape and y.dtype == slow.dtype


@pytest.mark.parametrize("tokens,fused,w13", [(1, True, None), (2, True, None), (4, False, None),
                                              (1, True, GemvConfig(block_n=32, block_k=256))])  # float w1/w3
def test_gated_launch_hands_w2_its_int16_activations(monkeypatch, tokens, fused, w13):
    """With int16 activations for w2 (the heuristic's default), the gated launch writes them
    itself where its row blocks hold whole words of w2's layout (16 rows at one or two tokens):
    two launches and no quantize_x between them. Its 8-row blocks at 4 tokens cannot, and h
    goes through quantize_x as before."""
    from runtime.kernels import triton_gemv

    gemv_rec, quant_rec = Recorder(), Recorder()
    monkeypatch.setattr(triton_gemv, "qgemv_kernel", gemv_rec)
    monkeypatch.setattr(triton_gemv, "xquant_kernel", quant_rec)
    layout = layout_of(256, 512, QuantSpec(2, 16, 4, 128))
    record = torch.zeros(layout.record_size, dtype=torch.uint8)
    x = torch.randn(tokens, 256)
    expert._decode(record, layout, x, {"w13": w13} if w13 else {})
    (_, first, kw1), (_, second, kw2) = gemv_rec.calls
    assert kw1["GATED"] and kw1["INT_X"] == (w13 is None) and kw2["INT_X"] and not kw1["PARTIAL"]
    row = (8 + 2) * 512 // 16  # w2's int16 pairs, word scales and word sums per token
    if fused:
        assert kw1["OUT_INT"] == 16 and kw1["OUT_PER"] == 1
        assert len(quant_rec.calls) == (1 if w13 is None else 0)  # only x's, for an int w1/w3
        h = first[1]
        assert h.dtype == torch.int32 and tuple(h.shape) == (tokens, row)
        assert second[0].data_ptr() == h.data_ptr() and second[17 + 2] == row  # w2 reads it with that row stride
        assert first[17 + 6] == row and first[17 + 5] == tokens * row  # written so (stride_ot, stride_oe)
    else:
        assert kw1["OUT_INT"] == 0 and len(quant_rec.calls) == 2  # x for w1/w3, then h for w2
        assert first[1].dtype == x.dtype


def test_out_int_is_granted_only_for_whole_words():
    spec, cfg = QuantSpec(2, 16, 8, 128), GemvConfig(block_n=16, block_k=256, int_x=True)
    x = torch.zeros(1, 512)
    assert qgemv.launch_plan(x, (256, 512), spec, True, cfg, out_int=16).out_int == 16
    assert qgemv.launch_plan(x, (256, 512), spec, True, replace(cfg, block_n=8), out_int=16).out_int == 0
    assert qgemv.launch_plan(x, (264, 512), spec, True, cfg, out_int=8).out_int == 8  # 33 words of 8
    assert qgemv.launch_plan(x, (264, 512), spec, True, cfg, out_int=16).out_int == 0  # 264 rows: no whole words
    assert qgemv.launch_plan(x, (256, 512), spec, True, replace(cfg, split_k=2), out_int=16).out_int == 0  # partials
    assert qgemv.launch_plan(x, (256, 512), spec, False, cfg, out_int=16).out_int == 0  # w2 itself: not gated


def test_decode_plan_falls_back(launches):
    """Layouts and records the plan does not cover take the general path, which raises
    its errors as before."""
    spec = QuantSpec(2, 16, 8, 128)
    assert expert._decode_plan(layout_of(256, 512, spec, QuantSpec(16))) is None  # w2 not quantized
    assert expert._decode_plan(layout_of(48, 96, spec)) is None  # K % 32 != 0: no fused GEMV
    layout = layout_of(256, 512, spec)
    record = torch.zeros(layout.record_size + 8, dtype=torch.uint8)
    x = torch.randn(1, 256)
    with pytest.raises(LayoutError, match="misaligned"):  # float components not 4-byte aligned
        expert.fused_expert_ffn(record[2:2 + layout.record_size], layout, x)
    with pytest.raises(LayoutError, match="needs bytes"):
        expert.fused_expert_ffn(record[:100], layout, x)
    with pytest.raises(LayoutError, match="last dimension must be 256"):
        expert.fused_expert_ffn(record[:layout.record_size], layout, torch.randn(1, 128))
