"""Expert FFNs, the resident backend, and the model's independence from where experts live."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from formats import MoepackFile
from runtime.experts import ExpertBackend, ResidentExperts, expert_ffn
from runtime.loader import load_model
from runtime.moe import route
from tests.runtime.packing_helpers import CPU_KERNEL_TOL


def test_expert_ffn_matches_numpy_decoding(file42):
    f = MoepackFile(file42)
    rec = torch.from_numpy(np.array(f.expert_bytes(1, 2)))
    x = torch.randn(5, f.config.hidden_size, generator=torch.Generator().manual_seed(0))
    w = {k: torch.from_numpy(v) for k, v in f.expert_arrays(1, 2).items()}
    ref = F.linear(F.silu(x @ w["w1"].T) * (x @ w["w3"].T), w["w2"])
    got = expert_ffn(rec, f.header.expert_layout, x, torch.float32)
    torch.testing.assert_close(got, ref, rtol=CPU_KERNEL_TOL, atol=CPU_KERNEL_TOL)
    assert expert_ffn(rec, f.header.expert_layout, x.double(), torch.float32).dtype == torch.float64


def test_cpu_resident_records_are_the_file_map(file42):
    """On the CPU the resident backend reads experts straight from the memory-mapped file: no
    copy (the CPU-only Mixtral run's RSS was twice the file), the bytes of each record, and no
    warning about the map being read-only."""
    import warnings

    f = MoepackFile(file42)
    cfg, rs = f.config, f.header.expert_layout.record_size
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend = ResidentExperts(f, torch.device("cpu"), torch.float32)
    base = f._map.ctypes.data  # the map's first byte
    for i in (0, len(backend.records) - 1):
        layer, e = divmod(i, cfg.num_local_experts)
        row = backend.records[i]
        assert row.is_contiguous() and row.numel() == rs
        assert row.data_ptr() == base + f.data_offset + f.header.expert(layer, e).offset  # a view, not a copy
        assert np.array_equal(row.numpy(), f.expert_bytes(layer, e))
    assert backend.stats()["resident_bytes"] == cfg.num_hidden_layers * cfg.num_local_experts * rs


def test_resident_backend_equals_per_token_loop(file42):
    f = MoepackFile(file42)
    cfg = f.config
    backend = ResidentExperts(f, torch.device("cpu"), torch.float32)
    assert isinstance(backend, ExpertBackend)
    assert backend.records.shape == (cfg.num_hidden_layers * cfg.num_local_experts, f.header.expert_layout.record_size)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, cfg.hidden_size, generator=g)
    idx, w = route(x, torch.randn(cfg.num_local_experts, cfg.hidden_size, generator=g), cfg.num_experts_per_tok)
    got = backend.forward(1, x, idx, w)
    ref = torch.zeros_like(x)
    for t in range(9):
        for j in range(cfg.num_experts_per_tok):
            rec = torch.from_numpy(np.array(f.expert_bytes(1, int(idx[t, j]))))
            ref[t] += w[t, j] * expert_ffn(rec, f.header.expert_layout, x[t : t + 1], torch.float32)[0]
    torch.testing.assert_close(got, ref, rtol=CPU_KERNEL_TOL, atol=CPU_KERNEL_TOL)
    s = backend.stats()
    assert s["expert_tokens"] == 9 * cfg.num_experts_per_tok and s["expert_evals"] == len(torch.unique(idx))
    backend.reset_stats()
    assert backend.stats()["expert_evals"] == 0


def test_route_is_softmax_topk_renormalise():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    router = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.5, 0.5]])
    idx, w = route(x, router, 2)
    p = torch.softmax(x @ router.T, -1)
    assert idx.tolist() == [[2, 0], [1, 3]] and idx.dtype == torch.int64
    torch.testing.assert_close(w[0], p[0, [2, 0]] / p[0, [2, 0]].sum())
    torch.testing.assert_close(w.sum(-1), torch.ones(2))


class RecordingBackend:
    """Wraps the resident backend and remembers what the model asked of it."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def forward(self, layer, x, topk_idx, topk_w):
        self.calls.append((layer, x.clone(), topk_idx.clone()))
        return self.inner.forward(layer, x, topk_idx, topk_w)

    def stats(self):
        return {"calls": len(self.calls)}

    def reset_stats(self):
        self.calls.clear()


def test_custom_backend_factory(file42):
    made = []

    def factory(file, model, device, dtype):
        assert model.router_weights(0).shape == (file.config.num_local_experts, file.config.hidden_size)
        made.append(RecordingBackend(ResidentExperts(file, device, dtype)))
        return made[-1]

    model, file = load_model(file42, torch.device("cpu"), torch.float32, expert_backend_factory=factory, ctx=32)
    plain, _ = load_model(file42, torch.device("cpu"), torch.float32, ctx=32)
    tokens = torch.tensor([1, 5, 9, 200])
    torch.testing.assert_close(model(tokens, 0), plain(tokens, 0))
    calls = made[0].calls
    assert [c[0] for c in calls] == list(range(file.config.num_hidden_layers))
    for layer, x, idx in calls:
        assert x.shape == (4, file.config.hidden_size) and idx.shape == (4, 2)
        # x is the router input: routing it with router_weights(layer) gives the same experts
        assert torch.equal(route(x, model.router_weights(layer), 2)[0], idx)
    assert model.experts.stats() == {"calls": file.config.num_hidden_layers}


def test_resident_graph_interface_matches_the_eager_path(tmp_path, monkeypatch):
    """ResidentExperts(cuda_graphs=True) on the CPU takes the one-token path through
    runtime.graphs.ExpertGraphs (run eagerly here): same logits as the torch path (the one
    the C decode step, runtime.cpu_step, replaces by default)."""
    import functools

    monkeypatch.setenv("MOEPACK_CPU_STEP", "0")
    from runtime.experts import resident_experts
    from tests.runtime.test_offload_helpers import tiny_file

    path = tiny_file(tmp_path, 2, 4)
    ref, _ = load_model(path, "cpu", torch.float32, ctx=32)
    got, _ = load_model(path, "cpu", torch.float32, ctx=32,
                        expert_backend_factory=functools.partial(resident_experts, cuda_graphs=True))
    prompt = torch.tensor([3, 7, 11, 19])
    assert torch.equal(got(prompt, 0), ref(prompt, 0))
    for pos, tok in enumerate([5, 9, 2], start=4):
        torch.testing.assert_close(got(torch.tensor([tok]), pos), ref(torch.tensor([tok]), pos), rtol=1e-6, atol=1e-6)
    assert got.experts.graphs.replays == 3 * 2 * 2  # 3 steps x 2 layers x top-2
