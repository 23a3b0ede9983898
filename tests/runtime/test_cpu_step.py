"""One-token CPU decode in one C call (runtime.cpu_step, runtime/csrc/decode_cpu.c) against the
torch path it replaces (MOEPACK_CPU_STEP=0): the same greedy tokens, experts and statistics, and
logits within CPU_KERNEL_TOL (both round x to int16 for the expert kernels, and the C loop sums
in another order, so a rounding step can fall the other way). The torch path itself is checked
against transformers (test_model_vs_transformers, whose decode steps now run here too)."""

from __future__ import annotations

import functools
import math
import time

import pytest
import torch

from formats import MoepackFile
from formats.qtensor import QuantSpec
from runtime import cpu_step, qlinear
from runtime.cpu_expert import _native
from runtime.experts import resident_experts
from runtime.loader import load_model
from tests.runtime.packing_helpers import CPU_KERNEL_TOL, recipe, write_moepack
from tests.tiny import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(_native() is None, reason="no compiled CPU kernel here")

PROMPT = [1, 17, 250, 33, 100, 5, 77, 200]
STEPS = 20


def _decode(file, monkeypatch, on: bool, **load):
    """(logits of the prompt's last token and of STEPS greedy steps [STEPS + 1, V], the model)."""
    monkeypatch.setenv(cpu_step.ENV, "1" if on else "0")
    model, _ = load_model(file, torch.device("cpu"), torch.float32, ctx=64, **load)
    out = [model(torch.tensor(PROMPT), 0, last_only=True)]
    for i in range(STEPS):
        out.append(model(out[-1].argmax(-1), len(PROMPT) + i))
    return torch.cat(out), model


def _compare(file, monkeypatch, **load):
    a, model = _decode(file, monkeypatch, True, **load)
    b, ref = _decode(file, monkeypatch, False, **load)
    assert model.cpu_step[1] is not None and model.cpu_step[1].steps == STEPS
    assert ref.cpu_step[1] is None
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    torch.testing.assert_close(a, b, rtol=CPU_KERNEL_TOL, atol=CPU_KERNEL_TOL)
    assert model.experts.stats() == ref.experts.stats()
    return model


@pytest.mark.parametrize("recipe", ["16", "4/2", "4/3", "4/2m4"])
@pytest.mark.parametrize("dequantize_at_load", [False, True])
def test_cpu_step_matches_the_torch_path(packed_files, monkeypatch, recipe, dequantize_at_load):
    # fp16 experts, and 4/3's packed attention with fp16 scales and zeros: the compiled kernels
    # do not take them, so the torch path (numba or dequantize) runs those steps
    refusal = {"16": "an expert layout the compiled kernel does not take",
               "4/3": None if dequantize_at_load else "layer 0: a projection the C code does not multiply"}.get(recipe)
    if refusal is not None:
        monkeypatch.setenv(cpu_step.ENV, "1")
        model, _ = load_model(packed_files[recipe], torch.device("cpu"), torch.float32, ctx=64,
                              dequantize_at_load=dequantize_at_load)
        assert cpu_step.cpu_step_refusal(model, _native()) == refusal
        return
    model = _compare(packed_files[recipe], monkeypatch, dequantize_at_load=dequantize_at_load)
    kinds = {type(m) for layer in model.layers for m in (layer.attn.qkv_proj or layer.attn.q_proj, layer.attn.o_proj)}
    assert kinds == {qlinear.DenseLinear if dequantize_at_load else qlinear.QuantLinear}


def test_cpu_step_with_fp16_projections_and_a_sliding_window(tmp_path, monkeypatch):
    """fp16 attention kept fp16 (qlinear.HalfLinear: moepack_gemv_f16), and a window shorter than
    the decode, so the C loop's attention drops the oldest positions as the torch mask does."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=3, shards=1, sliding_window=5, tie_word_embeddings=True)
    file = MoepackFile(write_moepack(ckpt, tmp_path / "sw.moepack", recipe(experts=QuantSpec(2, 16, 4, 128))))
    monkeypatch.setattr(qlinear, "HALF_CPU_LIMIT", 0)
    model = _compare(file, monkeypatch)
    assert file.config.sliding_window == 5 and len(PROMPT) + STEPS > 5
    assert all(isinstance(m, qlinear.HalfLinear) for m in (model.layers[0].attn.q_proj, model.layers[0].attn.o_proj))


def test_the_step_times_its_phases(file42, monkeypatch):
    """Each phase's milliseconds per step, measured inside the C loop: none negative, the ones
    with arithmetic above zero, and together within the wall time of the steps around them."""
    monkeypatch.setenv(cpu_step.ENV, "1")
    model, _ = load_model(file42, torch.device("cpu"), torch.float32, ctx=64)
    assert model.cpu_step_phases() is None  # no one-token step yet
    token = model(torch.tensor(PROMPT), 0, last_only=True)[-1].argmax()
    token = model(token.view(1), len(PROMPT))[-1].argmax()
    model.reset_cpu_step_phases()
    assert set(model.cpu_step_phases().values()) == {0.0}
    t0 = time.perf_counter()
    for i in range(1, 6):
        token = model(token.view(1), len(PROMPT) + i)[-1].argmax()
    wall_ms = (time.perf_counter() - t0) * 1e3 / 5
    phases = model.cpu_step_phases()
    assert tuple(phases) == cpu_step.PHASES
    assert min(phases.values()) >= 0.0
    assert phases["attention_in"] > 0 and phases["experts"] > 0 and phases["head"] > 0
    assert sum(phases.values()) <= wall_ms
    model.use_torch_step()
    assert model.cpu_step_phases() is None


def test_a_step_the_c_loop_declines_runs_in_torch(file42, monkeypatch):
    """A non-finite activation: the GEMVs refuse it, the torch path runs the step (and writes the
    same cache positions), so the logits are the torch path's NaNs."""
    monkeypatch.setenv(cpu_step.ENV, "1")
    model, _ = load_model(file42, torch.device("cpu"), torch.float32, ctx=64)
    model(torch.tensor(PROMPT), 0)
    model(torch.tensor([5]), len(PROMPT))
    step = model.cpu_step[1]
    assert step.steps == 1
    with torch.no_grad():
        model.embed[7] = math.nan
    assert torch.isnan(model(torch.tensor([7]), len(PROMPT) + 1)).all()
    assert step.steps == 1


def test_a_new_context_or_backend_gets_a_new_step(file42, monkeypatch):
    """The C structs hold the cache's and the backend's addresses: a reallocated context, or
    another expert backend, must not reuse them."""
    monkeypatch.setenv(cpu_step.ENV, "1")
    model, _ = load_model(file42, torch.device("cpu"), torch.float32, ctx=64)
    model(torch.tensor(PROMPT), 0)
    first = model(torch.tensor([5]), len(PROMPT))
    old = model.cpu_step[1]
    model.allocate_context(32)
    assert model.cpu_step is None
    model(torch.tensor(PROMPT), 0)
    torch.testing.assert_close(model(torch.tensor([5]), len(PROMPT)), first, rtol=CPU_KERNEL_TOL, atol=CPU_KERNEL_TOL)
    assert model.cpu_step[1] is not old and model.cpu_step[1].steps == 1
    model.experts = type(model.experts)(MoepackFile(file42), torch.device("cpu"), torch.float32)
    model(torch.tensor([6]), len(PROMPT) + 1)
    assert model.cpu_step[0] is model.experts and model.cpu_step[1] is not old


def test_refusals(file42, monkeypatch):
    monkeypatch.setenv(cpu_step.ENV, "0")
    model, _ = load_model(file42, torch.device("cpu"), torch.float32, ctx=64)
    assert cpu_step.cpu_step_refusal(model, _native()) == "MOEPACK_CPU_STEP=0"
    monkeypatch.setenv(cpu_step.ENV, "1")
    assert cpu_step.cpu_step_refusal(model, None) == "no compiled CPU kernel"
    assert cpu_step.cpu_step_refusal(model, _native()) is None
    bf16, _ = load_model(file42, torch.device("cpu"), torch.bfloat16, ctx=64)
    assert cpu_step.cpu_step_refusal(bf16, _native()) == "not float32 on the CPU"
    graphs, _ = load_model(file42, torch.device("cpu"), torch.float32, ctx=64,
                           expert_backend_factory=functools.partial(resident_experts, cuda_graphs=True))
    assert cpu_step.cpu_step_refusal(graphs, _native()) == "the experts replay graphs"


def test_context_tool(capsys):
    """tools/cpu_step_context.py: both steps timed at a short and a long position."""
    import json

    from .test_offload_helpers import load_tool

    assert load_tool("cpu_step_context").main(["--tiny", "--context", "32", "--runs", "1"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["long_pos"] == 38 and all(row[k]["short_ms"] > 0 and row[k]["long_ms"] > 0 for k in ("c_step", "torch_step"))


@pytest.mark.parametrize("on", [True, False])
def test_generate_says_which_decode_path_ran(capsys, file42, monkeypatch, on):
    import json

    from runtime.generate import main

    monkeypatch.setenv(cpu_step.ENV, "1" if on else "0")
    assert main([str(file42), "-p", "The experts", "-n", "6", "--json"]) == 0
    record = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert record["new_tokens"] > 1 and record["decode_path"] == ("cpu step" if on else "torch")
    if on:
        assert tuple(record["cpu_step_ms"]) == cpu_step.PHASES and record["cpu_step_ms"]["experts"] > 0
    else:
        assert record["cpu_step_ms"] is None


@pytest.mark.parametrize("option", [None, "int16"])
def test_generate_on_the_cpu_rounds_to_int8_unless_asked(capsys, file42, auto_activations, option):
    """The default (auto) as a user meets it: int8 where the build takes it, int16 on request."""
    import json

    from runtime.generate import main

    args = [str(file42), "-p", "The experts", "-n", "4", "--device", "cpu", "--json"]
    assert main(args + (["--cpu-activations", option] if option else [])) == 0
    record = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    int8 = option is None and auto_activations.avx2
    assert record["cpu_activations"] == ("int8" if int8 else "int16")
