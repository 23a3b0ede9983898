"""The offloading engine on a real GPU: copy stream, events, pinned memory. Skipped without CUDA.

Copies are made artificially slow (a spin kernel ahead of each copy on the copy stream) and
so is compute (a spin kernel before each expert), so a missing "ready" wait reads a slot
before its copy lands and a missing "free" wait overwrites a slot before compute has read
it: either shows up as wrong logits."""

from __future__ import annotations

import warnings

import pytest
import torch

from formats.reader import MoepackFile
from runtime.loader import load_model
from runtime.offload.engine import OffloadedExperts
from runtime.offload.host import choose_resident
from runtime.offload.options import OffloadOptions, make_backend_factory, model_bytes
from runtime.offload.streams import CopyEngine
from runtime.offload.traces import SyntheticRouting, reference_params

from .offload_cases import (CTX, EXPERTS, HALF_TOL, HYBRID_MODES, LAYERS, PROMPT, assert_hybrid_mode_ran, assert_same,
                            force_hybrid_mode, greedy, hybrid_kw)
from .packing_helpers import CPU_KERNEL_TOL
from .test_offload_helpers import tiny_file

pytestmark = pytest.mark.cuda
SPIN = 2_000_000  # GPU clock cycles (~1 ms): far longer than a tiny expert's copy or compute


class SlowCopies(CopyEngine):
    def copy(self, dst, src, after=None):
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(SPIN)
        return super().copy(dst, src, after)


class SlowCompute(OffloadedExperts):
    def _record_for(self, op):
        record = super()._record_for(op)
        torch.cuda._sleep(SPIN)  # on the compute stream, after its wait, before the expert reads the slot
        return record


@pytest.fixture(scope="module")
def cuda_tiny(tmp_path_factory):
    path = tiny_file(tmp_path_factory.mktemp("offload-cuda"), LAYERS, EXPERTS)
    model, _ = load_model(path, "cuda", torch.float32, ctx=CTX)
    return path, greedy(model, PROMPT.cuda())


def cuda_offloaded(path, cls=OffloadedExperts, slow_copies=False, dtype=torch.float32, **kw):
    def factory(file, model, device, dtype):
        opts = dict(n_slots=2 * LAYERS, router_weights=model.router_weights, progress=False)
        opts.update(kw)
        backend = cls(file, device, dtype, **opts)
        if slow_copies:
            backend.copier = SlowCopies(device)
        return backend

    model, _ = load_model(path, "cuda", dtype, expert_backend_factory=factory, ctx=CTX)
    return model


@pytest.mark.parametrize("kw", [
    dict(n_slots=LAYERS),  # decode's two experts in waves through one slot: each copy waits for a compute
    dict(n_slots=2 * LAYERS),
    dict(n_slots=3 * LAYERS, prefetch=2),
    dict(n_slots=2, policy="shared", prefetch=2),
    dict(n_slots=2, policy="shared-lfu"),  # stage 21's small-card pool
    dict(n_slots=4 * LAYERS + 1, policy="shared", prefetch=2, prefetch_layers=2),
    dict(n_slots=2 * LAYERS, policy="none"),
    dict(n_slots=3 * LAYERS, prefetch=2, resident=9, staging=2),  # streaming from the file
], ids=["layer1", "layer2", "layer3-pf", "shared-min-pf", "shared-lfu-min", "shared-pf2x2", "none", "stream"])
@pytest.mark.parametrize("slow", ["copies", "compute"])
def test_cuda_same_as_resident(cuda_tiny, kw, slow):
    path, ref = cuda_tiny
    kw = dict(kw)
    if "resident" in kw:
        kw["host_resident"] = choose_resident(MoepackFile(path).header, kw.pop("resident"))
    model = cuda_offloaded(path, cls=SlowCompute if slow == "compute" else OffloadedExperts,
                           slow_copies=slow == "copies", **kw)
    got = greedy(model, PROMPT.cuda())
    assert_same(ref, got, tol=1e-4)  # atomic index_add_ order differs between runs on CUDA
    s = model.experts.stats()
    assert s["bytes_copied"] > 0 and s["copy_busy_s"] > 0
    if slow == "copies":
        assert s["compute_wait_s"] > 0  # the compute stream really waited on copies
    model.experts.close()


@pytest.mark.parametrize("n_slots", [2 * LAYERS, LAYERS])  # LAYERS: stage 21's one slot per layer, in waves
@pytest.mark.parametrize("mode", HYBRID_MODES)
def test_cuda_hybrid_same_as_resident(cuda_tiny, mode, n_slots):
    """Copy-or-compute on a real GPU with slow copies: a split expert's w2 h must wait for w2's
    copy into the scratch buffer, and the next copy into that buffer for the w2 h before it;
    with rows (a CPU at half the link's speed) the GPU's rows of w1/w3 wait for their copies;
    staged (--prefetch-w2), a split's w2 h waits for a copy queued one layer earlier."""
    path, ref = cuda_tiny
    model = cuda_offloaded(path, slow_copies=True, hybrid=True, cpu_threads=1, n_slots=n_slots, **hybrid_kw(mode))
    force_hybrid_mode(model, mode)
    got = greedy(model, PROMPT.cuda())
    assert_same(ref, got, tol=CPU_KERNEL_TOL)  # the CPU kernel rounds activations to integers
    assert_hybrid_mode_ran(model, mode)
    model.experts.close()


@pytest.mark.parametrize("mode", ["waves", *HYBRID_MODES])
def test_cuda_half_precision_same_as_resident(cuda_tiny, mode):
    """float16, what runtime.generate runs on CUDA (the tests above are float32): the slots,
    the scratch sets, the CPU experts' uploads and the graphs in half precision, against the
    resident model in float16 on the same GPU."""
    path, _ = cuda_tiny
    resident, _ = load_model(path, "cuda", torch.float16, ctx=CTX)
    ref = greedy(resident, PROMPT.cuda())
    kw = dict(n_slots=LAYERS) if mode == "waves" else dict(hybrid=True, cpu_threads=1, **hybrid_kw(mode))
    model = cuda_offloaded(path, slow_copies=True, dtype=torch.float16, **kw)
    if mode != "waves":
        force_hybrid_mode(model, mode)
    assert_same(ref, greedy(model, PROMPT.cuda()), tol=HALF_TOL[torch.float16])
    if mode != "waves":
        assert_hybrid_mode_ran(model, mode)
    model.experts.close()


def test_cuda_host_tier_is_pinned(cuda_tiny):
    path, _ = cuda_tiny
    resident = choose_resident(MoepackFile(path).header, 9)
    model = cuda_offloaded(path, host_resident=resident, staging=2)
    host = model.experts.host
    assert host.pinned and all(t.is_pinned() for t in host.chunks) and all(t.is_pinned() for t in host._staging)
    assert model.experts.slots.is_cuda
    model.experts.close()


def _offload_syncs(model, steps: int) -> list:
    pos = PROMPT.numel()
    model(PROMPT.cuda(), 0)
    torch.cuda.synchronize()
    token = torch.tensor([1], device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(steps):
                token = model(token, pos + i, last_only=True)[-1].argmax().view(1)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return [w for w in caught if "synchroniz" in str(w.message) and "offload" in w.filename.replace("\\", "/")]


def test_cuda_decode_syncs_only_for_the_routing_decision(cuda_tiny):
    path, _ = cuda_tiny
    model = cuda_offloaded(path, n_slots=3 * LAYERS, prefetch=2)
    steps = 4
    syncs = _offload_syncs(model, steps)
    # exactly one host sync per layer: this layer's top-k and the next layer's guesses, fetched together
    assert len(syncs) == steps * LAYERS, [(w.filename, w.lineno) for w in syncs]
    assert len({(w.filename, w.lineno) for w in syncs}) == 1
    model.experts.routing = SyntheticRouting(reference_params(LAYERS, EXPERTS), 0.8, seed=0)
    # the trace decides which experts run, but only once the router has run: a real run cannot
    # know layer l+1's experts before layer l's output, so trace mode still reads the router's
    # top-k (one sync per layer) rather than queueing a whole token's copies ahead (an oracle)
    traced = _offload_syncs(model, steps)
    assert len(traced) == steps * LAYERS, [(w.filename, w.lineno) for w in traced]
    assert len({(w.filename, w.lineno) for w in traced}) == 1
    model.experts.close()


def test_cuda_default_budget_and_factory(cuda_tiny):
    path, ref = cuda_tiny
    factory = make_backend_factory(OffloadOptions(offload=True), ctx=CTX, progress=False)
    model, _ = load_model(path, "cuda", torch.float32, expert_backend_factory=factory, ctx=CTX)
    assert model.experts.cache.n_slots == LAYERS * EXPERTS  # a tiny model fits any real GPU
    assert_same(ref, greedy(model, PROMPT.cuda()), tol=1e-4)
    model.experts.close()


def test_cuda_offload_keeps_the_table_in_host_ram(cuda_tiny):
    """runtime.generate's load: an offloaded model's embedding table stays on the host, the plan
    and the device bytes leave it out, and tokens on either side give the resident logits (a
    token on the device costs a sync, with graphs too)."""
    from runtime.generate import load

    path, ref = cuda_tiny
    model, file, _ = load(str(path), "cuda", "float32", CTX, False, None, OffloadOptions(gpu_memory=1 << 30))
    assert model.embed_on_host and model.embed.device.type == "cpu"
    assert model.experts.plan.embed_on_host
    device, model.device = model.device, torch.device("cpu")
    assert model_bytes(model) == model.embed.numel() * model.embed.element_size()  # the host's share: the table
    model.device = device
    assert_same(ref, greedy(model, PROMPT.cuda()), tol=1e-4)
    model(PROMPT.cuda(), 0)
    on_device = model(torch.tensor([3], device="cuda"), PROMPT.numel(), last_only=True)
    model(PROMPT.cuda(), 0)
    assert torch.equal(on_device, model(torch.tensor([3]), PROMPT.numel(), last_only=True))
    model.experts.close()


@pytest.mark.parametrize("backend", ["resident", "resident-step", "offload"])
def test_cuda_graphs_same_as_eager(cuda_tiny, backend):
    """Decode steps that replay captured graphs give the eager path's tokens and logits: with
    the host reading the routing, the dense part of each layer (runtime.decode_graphs) and each
    expert (runtime.graphs), with every expert resident and with slots refilled (slowly) under
    the graphs; with the experts chosen on the device, the whole step (runtime.step_graph)."""
    import functools

    from runtime.experts import resident_experts

    path, _ = cuda_tiny
    if backend.startswith("resident"):
        def make(graphs):
            factory = functools.partial(resident_experts, cuda_graphs=graphs, device_routing=backend == "resident-step")
            return load_model(path, "cuda", torch.float32, ctx=CTX, cuda_graphs=graphs, expert_backend_factory=factory)[0]
    else:
        def make(graphs):
            m = cuda_offloaded(path, cls=SlowCompute, slow_copies=True, n_slots=2 * LAYERS, prefetch=2,
                               cuda_graphs=graphs)
            m.use_decode_graphs = graphs
            return m
    eager, graphed = make(False), make(True)
    assert_same(greedy(eager, PROMPT.cuda()), greedy(graphed, PROMPT.cuda()), tol=1e-4)
    if backend == "resident-step":
        assert graphed.step_graph is not None and graphed.step_graph.replays > 0 and graphed.decode_graphs is None
        return
    assert graphed.experts.stats()["cuda_graphs"] and not eager.experts.stats()["cuda_graphs"]
    assert graphed.experts.graphs.replays > 0
    assert graphed.decode_graphs.replays > 0 and graphed.decode_graphs.capturing
