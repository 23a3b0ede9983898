"""A whole decode step with the experts chosen on the device (runtime.step_graph,
ResidentExperts.routes_on_device). On the CPU the kernels run under the Triton interpreter
and the step runs eagerly; it must give the tokens and logits of host routing. (CUDA graph
capture itself is checked by tests/runtime/test_cuda.py.)"""

from __future__ import annotations

import functools

import pytest
import torch

from formats.errors import ConfigError
from runtime.experts import resident_experts
from runtime.loader import load_model

from .interpreter import interpreted_kernels, use_interpreter
from .offload_cases import CTX, assert_same, greedy
from .test_offload_helpers import tiny_file

interpreted_kernels()
LAYERS = 2
PROMPT = torch.tensor([5, 17])  # short: the interpreter runs every expert the prompt routes to
NEW = 3


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    use_interpreter(monkeypatch)
    if not torch.cuda.is_available():
        # one program per tiny matrix: the interpreter runs programs one after another, at
        # seconds per launch with the heuristic's narrow tiles
        from runtime.kernels import configs

        def whole_matrix(n, k, t, spec, gated=False, sm_count=0, int_x=False):
            return configs.GemvConfig(block_n=1 << (n - 1).bit_length(), block_k=max(32, 1 << (k - 1).bit_length()),
                                      int_x=int_x and spec.bits == 2).for_matrix(k, spec)

        monkeypatch.setattr(configs, "_heuristic_config", whole_matrix)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return tiny_file(tmp_path_factory.mktemp("step-graph"), LAYERS, 8)


# on the CPU under the interpreter, on CUDA compiled (and then in `pytest -m cuda`)
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="kernels are compiled for CUDA here")),
    pytest.param("cuda", marks=pytest.mark.cuda),
]


def _load(path, graphs: bool, routing: bool | None, dev: str = "cpu"):
    dtype = torch.float16 if dev == "cuda" else torch.float32
    factory = functools.partial(resident_experts, device_routing=routing)
    # dense attention and lm_head: only the experts run the (slow, interpreted) kernels
    return load_model(path, dev, dtype, ctx=CTX, cuda_graphs=graphs, expert_backend_factory=factory,
                      dequantize_at_load=True)


def _model(path, graphs: bool, routing: bool | None, dev: str = "cpu"):
    return _load(path, graphs, routing, dev)[0]


@pytest.mark.parametrize("device", DEVICES)
def test_device_routed_step_matches_host_routing(tiny_path, monkeypatch, device):
    with monkeypatch.context() as m:
        m.delenv("TRITON_INTERPRET", raising=False)  # the reference: host routing on the plain CPU path
        ref = _model(tiny_path, False, False, device)
        want = greedy(ref, PROMPT, NEW)
    got = _model(tiny_path, True, True, device)
    assert got.experts.routes_on_device and not ref.experts.routes_on_device
    assert_same(want, greedy(got, PROMPT, NEW), tol=1e-3 if ref.device.type == "cpu" else 2e-2)
    assert got.step_graph is not None and got.decode_graphs is None  # the one-graph step, not per layer
    # without graphs the one-token forward also routes on the device (no host sync), eagerly
    eager = _model(tiny_path, False, True, device)
    assert_same(want, greedy(eager, PROMPT, NEW), tol=1e-3 if ref.device.type == "cpu" else 2e-2)
    assert eager.step_graph is None


@pytest.mark.parametrize("device", DEVICES)
def test_each_step_counts_its_expert_calls(tiny_path, device):
    m = _model(tiny_path, True, True, device)
    for pos in range(2):
        m(torch.tensor([7]), pos)
    k = m.config.num_experts_per_tok
    assert m.experts.stats()["expert_evals"] == 2 * LAYERS * k
    assert m.experts.stats()["routes_on_device"] is True


@pytest.mark.parametrize("device", DEVICES)
def test_new_context_or_backend_drops_the_step_graph(tiny_path, device):
    m, file = _load(tiny_path, True, True, device)
    m(torch.tensor([7]), 0)
    assert m.step_graph is not None
    m.allocate_context(CTX + 8)
    assert m.step_graph is None
    m(torch.tensor([7]), 0)
    assert m.step_graph.key_pos.numel() == CTX + 8
    graph = m.step_graph
    m.experts = resident_experts(file, m, m.device, m.dtype, device_routing=True)
    m(torch.tensor([7]), 0)
    assert m.step_graph is not graph and m.step_graph.experts is m.experts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stacked", [False, True])
def test_fused_step_matches_torchs_small_ops(tiny_path, tmp_path, monkeypatch, device, stacked):
    """decode_graphs.fused_segment (kernels.decode_ops) against the same step with torch's
    small ops (MOEPACK_FUSED_DECODE=0): packed attention whose GEMVs split K, so split-K
    partials, not only the experts', reach the fused norm and rotary kernels. The tiny file's
    q, k and v do not stack (64 groups, meta groups of 256); `stacked` widens the model so
    they do (Attention.fuse_qkv)."""
    from runtime import decode_graphs
    from runtime.kernels import configs, decode_ops, qgemv

    from .test_offload_helpers import RECIPE_4_2, tiny_config, write_synthetic

    if stacked:
        cfg = tiny_config(LAYERS, 8, hidden_size=256, num_attention_heads=8, head_dim=32)
        tiny_path = write_synthetic(tmp_path / "wide.moepack", cfg, RECIPE_4_2)

    if device == "cpu":
        def split_in_two(n, k, t, spec, gated=False, sm_count=0, int_x=False):
            # the attention's (4-bit) K in two slices: the fewest programs with partials (the
            # interpreter runs programs one by one); the experts as in the other tests
            split = 2 if spec.bits == 4 else 1
            return configs.GemvConfig(block_n=1 << (n - 1).bit_length(),
                                      block_k=max(32, (1 << (k - 1).bit_length()) // split), split_k=split,
                                      int_x=int_x and spec.bits == 2).for_matrix(k, spec)

        monkeypatch.setattr(configs, "_heuristic_config", split_in_two)
    parts = []
    real = decode_ops._rows

    def seen(y, t, n):
        out = real(y, t, n)
        parts.append((out[1], n))
        return out

    monkeypatch.setattr(decode_ops, "_rows", seen)
    conversions = []  # the GEMVs' own conversions of x: fewer when the norms write their format
    for name in ("quantize_x", "permute_x"):
        real_conv = getattr(qgemv, name)
        monkeypatch.setattr(qgemv, name, functools.partial(lambda f, n, *a: conversions.append(n) or f(*a), real_conv, name))
    load = functools.partial(load_model, tiny_path, device, torch.float16 if device == "cuda" else torch.float32,
                             ctx=CTX, cuda_graphs=True, dequantize_at_load=False,
                             expert_backend_factory=functools.partial(resident_experts, device_routing=True))
    with monkeypatch.context() as m:
        m.setenv(decode_graphs.FUSED_ENV, "0")
        want = greedy(load()[0], PROMPT[:1], NEW)
    assert not parts  # the unfused step never reached the fused kernels
    unfused_conversions, conversions[:] = len(conversions), []
    model = load()[0]
    assert (model.layers[0].attn.qkv_proj is not None) == stacked
    got = greedy(model, PROMPT[:1], NEW)
    assert_same(want, got, tol=1e-3 if device == "cpu" else 2e-2)
    # P = 0: the first layer's norm of each one-token step (the one-token prompt's and NEW
    # more); the stacked q/k/v GEMV's two K slices reach the rotary kernel (unstacked: one
    # concatenated output); the o GEMV's two slices and the two experts' outputs the norms
    cfg = model.config
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    assert [p for p, _ in parts].count(0) == NEW + 1
    # per layer and step: the experts' int16 x and (stacked) the q/k/v GEMV's permuted x
    # come from the norms, o's from the attention (decode_ops.attend); w2's is still converted
    if device == "cpu":  # the configs set above (on CUDA the heuristic's)
        assert len(conversions) == unfused_conversions - (NEW + 1) * LAYERS * (3 if stacked else 2)
        assert {p for p, n in parts if n == qkv} == {2 if stacked else 1}
        assert {p for p, n in parts if n == cfg.hidden_size} == {0, 2}


@pytest.mark.parametrize("device", DEVICES)
def test_fused_segments_in_per_layer_graphs(tiny_path, monkeypatch, device):
    """Host routing (runtime.decode_graphs: a graph per layer, the experts by the backend in
    between, as the offloading engine runs) takes the fused segment too, with nothing pending
    from the layer before: the same tokens as torch's small ops."""
    from runtime import decode_graphs

    with monkeypatch.context() as m:
        m.setenv(decode_graphs.FUSED_ENV, "0")
        ref = _model(tiny_path, True, False, device)
        want = greedy(ref, PROMPT[:1], NEW)
    calls = []
    real = decode_graphs.fused_segment
    monkeypatch.setattr(decode_graphs, "fused_segment", lambda *a: calls.append(a[2]) or real(*a))
    got = _model(tiny_path, True, False, device)
    assert_same(want, greedy(got, PROMPT[:1], NEW), tol=1e-3 if device == "cpu" else 2e-2)
    assert got.decode_graphs is not None and got.step_graph is None
    # every layer of every one-token step on CPU (eager), of the captured steps on CUDA
    assert calls and all(p is None for p in calls)
    if device == "cpu":
        assert len(calls) == (NEW + 1) * LAYERS


def test_device_routing_needs_the_kernels(tiny_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the kernels run on CUDA")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match="device routing needs"):
        _model(tiny_path, True, True)
    assert not _model(tiny_path, True, None).experts.routes_on_device  # auto: host routing on the CPU


def test_count_decode_ops_tool(monkeypatch, capsys):
    """tools/count_decode_ops.py: the step graph's layer dispatches fewer ops than a per-layer
    graph's (the rotary rows and the mask are shared by the layers), and the fused small-op
    kernels far fewer again, also for a whole packed layer with its experts."""
    import re
    from pathlib import Path

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "tools"))
    import count_decode_ops

    assert count_decode_ops.main() == 0
    counts = [int(n) for n in re.findall(r": (\d+) non-view ops", capsys.readouterr().out)]
    per_layer, per_step, fused, packed, packed_fused = counts
    assert 0 < fused < per_step / 2 < per_layer / 2
    # a whole packed layer with its experts: the GEMVs (4) stay, nearly all else goes; at one
    # token the gated w1/w3 writes w2's int16 input itself (9: 2 norms, 4 GEMVs, rotary,
    # attention's split and combine, the combine writing o's int16 input)
    assert 4 < packed_fused <= 9 and packed_fused < packed / 3


PROMPT20 = torch.tensor([5, 17, 42, 99, 3, 250, 7, 64, 128, 11])  # 20 (token, choice) pairs > 16


def _prompt_matches_per_expert(tiny_path, monkeypatch, device, grouped: str, chunk: int | None = None):
    """A prompt through the model with its experts on one device buffer gives the logits of
    the per-expert path (host routing, plain CPU path), runs runtime.experts.<grouped> once
    per layer, and keeps the stats (each expert that had tokens counted)."""
    import runtime.experts as experts_mod

    with monkeypatch.context() as m:
        m.delenv("TRITON_INTERPRET", raising=False)
        ref = _model(tiny_path, False, False, device)
        want = ref(PROMPT20, 0)
        want_evals = ref.experts.stats()["expert_evals"]
    got = _model(tiny_path, False, True, device)
    assert got.experts.prompt_chunk >= got.config.num_local_experts  # tiny experts: all in one launch
    if chunk:
        got.experts.prompt_chunk = chunk
    calls = []
    real = getattr(experts_mod, grouped)
    monkeypatch.setattr(experts_mod, grouped, lambda *a, **k: calls.append(1) or real(*a, **k))
    tol = 1e-3 if got.device.type == "cpu" else 2e-2  # float16 on CUDA
    torch.testing.assert_close(got(PROMPT20, 0), want, rtol=tol, atol=tol)
    assert len(calls) == LAYERS
    s = got.experts.stats()
    assert s["expert_evals"] == want_evals and s["expert_tokens"] == LAYERS * PROMPT20.numel() * got.config.num_experts_per_tok


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_prompt_matches_the_per_expert_path(tiny_path, monkeypatch, device):
    """MOEPACK_PREFILL=fused: a prompt's experts run in the fused GEMM's grouped mode (two
    launches per layer, no host sync)."""
    monkeypatch.setenv("MOEPACK_PREFILL", "fused")
    _prompt_matches_per_expert(tiny_path, monkeypatch, device, "grouped_expert_ffn")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [None, 3])
def test_prompt_chunks_match_the_per_expert_path(tiny_path, monkeypatch, device, chunk):
    """The default prompt path: a layer's experts dequantized a few per launch
    (kernels.grouped_prompt_ffn), every expert by default and three per launch when the
    scratch allows no more."""
    _prompt_matches_per_expert(tiny_path, monkeypatch, device, "grouped_prompt_ffn", chunk)


def test_key_buckets():
    from runtime.step_graph import MIN_KEYS, key_bucket

    assert key_bucket(0, 4096) == MIN_KEYS == 256
    assert [key_bucket(p, 4096) for p in (255, 256, 511, 512, 3000, 4095)] == [256, 512, 512, 1024, 4096, 4096]
    assert key_bucket(100, 64) == 64  # never past the allocated context
    for p in range(0, 5000, 7):
        assert key_bucket(p, 8192) > p  # the position itself is always attended
        assert key_bucket(p, 8192, whole=True) == 8192  # the split-key attention: one graph


@pytest.mark.parametrize("flash", ["1", "0"])
@pytest.mark.parametrize("device", DEVICES)
def test_steps_across_key_buckets_match_host_routing(tiny_path, monkeypatch, device, flash):
    """With torch's attention (MOEPACK_FLASH_DECODE=0), steps attend over the next power of two
    of cache positions (one graph per bucket); with the split-key kernels, over the whole
    cache in one graph. The same tokens and logits as host routing either way, across bucket
    boundaries."""
    import runtime.step_graph as sg

    monkeypatch.setattr(sg, "MIN_KEYS", 2)  # buckets 2, 4, 8, 16 inside the tiny context
    with monkeypatch.context() as m:
        m.delenv("TRITON_INTERPRET", raising=False)
        want = greedy(_model(tiny_path, False, False, device), PROMPT, 6)  # positions 2 .. 7
    monkeypatch.setenv("MOEPACK_FLASH_DECODE", flash)
    got = _model(tiny_path, True, True, device)
    assert_same(want, greedy(got, PROMPT, 6), tol=1e-3 if device == "cpu" else 2e-2)
    assert got.step_graph.whole == (flash == "1")
    if device == "cuda":
        assert sorted(got.step_graph.graphs) == ([CTX] if flash == "1" else [4, 8])
