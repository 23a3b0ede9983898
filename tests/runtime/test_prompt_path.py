"""The many-token expert path (kernels.expert._prompt): w1 and w3 dequantized by one launch
into one scratch matrix (or one at a time into a one-matrix scratch), one matmul for both,
the gate in place, then w2 through the same scratch; and a layer's experts a few per launch
(kernels.grouped_prompt_ffn). Checked against the format's reference decoder and against the
general path, under the Triton interpreter on the CPU (compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch

from formats.header import ExpertLayout, MatrixLayout
from formats.qtensor import QuantSpec
from formats.spec import ALIGNMENT, COMPONENT_ALIGNMENT, align_up
from formats.writer import pack_expert

from .interpreter import interpreted_kernels, use_interpreter

interpreted_kernels()

from runtime.kernels import expert, fused_expert_ffn, prefill  # noqa: E402

from .kernel_cases import ACT, DEVICES, on_device, packed, reference_expert, rel_err  # noqa: E402


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    use_interpreter(monkeypatch)


def expert_in_order(hidden: int, inter: int, spec: QuantSpec, order: tuple[str, ...], seed: int):
    """(layout, record bytes, reference Ws) with the matrices laid out in `order`."""
    shapes = {"w1": (inter, hidden), "w3": (inter, hidden), "w2": (hidden, inter)}
    mats, offset, data, ref = [], 0, {}, {}
    for i, name in enumerate(order):
        mats.append(MatrixLayout(name, shapes[name], spec, offset))
        offset = align_up(offset + mats[-1].nbytes, COMPONENT_ALIGNMENT)
        data[name], ref[name] = packed(shapes[name], spec, seed + i)
    layout = ExpertLayout(align_up(offset, ALIGNMENT), tuple(mats))
    return layout, pack_expert(layout, data), ref


class Launches:
    """Records each dequantize_words_into call the prompt path makes: (matrices, rows)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = expert.dequantize_words_into

        def spy(args, shape, spec, out, mats=1, delta=0, group=None):
            self.calls.append((mats, shape[0]))
            return real(args, shape, spec, out, mats=mats, delta=delta, group=group)

        monkeypatch.setattr(expert, "dequantize_words_into", spy)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pair", [True, False], ids=["pair", "one-matrix"])
@pytest.mark.parametrize("spec,tokens,order", [
    (QuantSpec(2, 16, 8, 128), 17, ("w1", "w3", "w2")),  # Mixtral's experts at 2 bits
    (QuantSpec(2, 16, 4, 128), 33, ("w1", "w3", "w2")),  # 4-bit scale/zero codes
    (QuantSpec(3, 64, 8, 128), 20, ("w1", "w3", "w2")),  # the high bit plane moves with w3
    (QuantSpec(4, 32, 16), 18, ("w1", "w3", "w2")),  # float16 scales and zeros
    (QuantSpec(2, 16, 8, 128), 19, ("w1", "w2", "w3")),  # w3 past w2: the distance is not w1's size
    (QuantSpec(2, 16, 8, 128), 21, ("w3", "w2", "w1")),  # w3 first: a negative distance
])
def test_prompt_path_matches_the_reference(device, pair, spec, tokens, order, monkeypatch):
    dtype, tol = ACT[device]
    hidden, inter = 64, 128
    layout, record, ref = expert_in_order(hidden, inter, spec, order, seed=30)
    # a row the kernel forgets to write stays NaN in the scratch, and shows in the result
    prefill.release_scratch()
    prefill.scratch(torch.device(device), dtype, 2 * inter * hidden).fill_(float("nan"))
    x = (0.1 * torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(5))).to(device, dtype)
    launches = Launches(monkeypatch)
    y = fused_expert_ffn(on_device(record, device), layout, x, prompt_pair=pair)
    # w1 and w3 in one launch (or one each into a one-matrix scratch), then w2
    assert launches.calls == ([(2, inter)] if pair else [(1, inter), (1, inter)]) + [(1, hidden)]
    assert y.shape == (tokens, hidden) and y.dtype == dtype
    assert rel_err(y, reference_expert(x, ref)) < (tol if device == "cpu" else 1e-2)
    # the general path (a launch and a matmul per matrix) gives the same FFN
    monkeypatch.setattr(expert, "_prompt", lambda *a: None)
    general = fused_expert_ffn(on_device(record, device), layout, x)
    assert len(launches.calls) == 3 - pair  # the general path goes through prefill.dequantize_into
    assert rel_err(y, general) < (1e-6 if device == "cpu" else 3e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec,mode", [
    # groups of 24 codes straddle the 16-code words: no word kernel, the general path's
    # byte-wise dequantize runs
    (QuantSpec(2, 24, 8, 128), "dequant"),
    # MOEPACK_PREFILL=fused keeps its own kernels (triton_gemm): the dense scratch is never written
    (QuantSpec(2, 16, 8, 128), "fused"),
], ids=["group-24", "fused-gemm"])
def test_other_paths_than_the_prompt_path(device, spec, mode, monkeypatch):
    dtype, tol = ACT[device]
    monkeypatch.setenv(prefill.PREFILL_ENV, mode)
    layout, record, ref = expert_in_order(96, 192, spec, ("w1", "w3", "w2"), seed=40)
    launches = Launches(monkeypatch)
    x = (0.1 * torch.randn(17, 96, generator=torch.Generator().manual_seed(6))).to(device, dtype)
    y = fused_expert_ffn(on_device(record, device), layout, x)
    assert launches.calls == []
    assert rel_err(y, reference_expert(x, ref)) < (tol if device == "cpu" else 1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [1, 2, 4, 8])
def test_grouped_prompt_runs_each_block_through_its_expert(device, chunk, monkeypatch):
    """A layer's experts (record rows 2 .. 7 of 8) over a prompt's rows sorted by expert,
    `chunk` experts dequantized per launch: each block comes out as its expert's FFN. A chunk
    whose experts no row chose makes no launch; an expert with no rows inside a chunk is
    skipped by the kernel (its rows of the scratch stay NaN, and nothing reads them)."""
    from runtime.kernels import grouped_prompt_ffn

    dtype, tol = ACT[device]
    hidden, inter = 64, 128
    spec = QuantSpec(2, 16, 4, 128)
    experts = [expert_in_order(hidden, inter, spec, ("w1", "w3", "w2"), seed=60 + 3 * i) for i in range(8)]
    layout = experts[0][0]
    records = torch.stack([on_device(rec, device) for _, rec, _ in experts])  # [8, record_size]
    counts = [3, 20, 0, 0, 2, 5]  # experts 2 .. 7; with chunk 2 the middle chunk has no rows
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64, device=device)
    xs = (0.1 * torch.randn(sum(counts), hidden, generator=torch.Generator().manual_seed(8))).to(device, dtype)
    prefill.release_scratch()
    prefill.scratch(torch.device(device), dtype, min(chunk, 6) * 2 * inter * hidden).fill_(float("nan"))
    launches = Launches(monkeypatch)
    y = grouped_prompt_ffn(records, 2, counts, offsets, xs, layout, chunk)
    assert y.shape == xs.shape and y.dtype == dtype
    starts = offsets.tolist()
    for e, n in enumerate(counts):
        if n:
            ref = reference_expert(xs[starts[e]:starts[e] + n], experts[2 + e][2])
            assert rel_err(y[starts[e]:starts[e] + n], ref) < (tol if device == "cpu" else 1e-2), e
    busy = sum(1 for c0 in range(0, len(counts), chunk) if any(counts[c0:c0 + chunk]))
    assert launches.calls == [(2, inter), (1, hidden)] * busy  # w1 and w3 of the chunk, then its w2
    if chunk >= 4:  # expert 3 (no rows) shares the first chunk: its w1/w3 block is never written
        block = 2 * inter * hidden
        assert prefill.scratch(torch.device(device), dtype, 4 * block)[3 * block:].isnan().all()


def test_prefill_host_tool(tmp_path, monkeypatch):
    """tools/prefill_host.py: an expert's prompt path makes two Triton launches, and a layer of
    a Mixtral-structured model four (two per chunk of experts), with every expert used."""
    import json
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "tools"))
    import prefill_host

    out = tmp_path / "host.json"
    assert prefill_host.main(["--calls", "20", "--layer-tokens", "64", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["expert"]["triton_launches_per_expert"] == 2 and r["expert"]["torch_kernels_per_expert"] == 4
    assert r["expert"]["host_us_per_expert"] > 0 and r["layer"]["moe_block_host_us"] > 0
    layer = r["layer"]
    assert layer["experts_per_layer"] == 8 and layer["triton_launches_per_layer"] == 4
    assert layer["per_layer"]["triton:dequant_words_kernel"] == 4
