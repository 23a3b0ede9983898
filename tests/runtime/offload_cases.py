"""What the offload engine's tests share (test_offload_engine.py, test_offload_hybrid.py, and the
CUDA, graph, CPU-job and host-embedding tests that reuse it): the tiny synthetic file's shape and
prompt, the resident model's greedy decode of it, the module-scoped `tiny` fixture (the file and
that reference), an offloaded model of the file, and the check that two decodes agree."""

from __future__ import annotations

import pytest
import torch

from runtime.loader import load_model
from runtime.offload.engine import OffloadedExperts

from .packing_helpers import CPU_KERNEL_TOL
from .test_offload_helpers import tiny_file


LAYERS, EXPERTS, CTX = 3, 8, 64
PROMPT = torch.tensor([5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 1])
NEW = 8


def greedy(model, prompt: torch.Tensor = PROMPT, new: int = NEW):
    """(all logits [steps, V] float32, generated tokens)."""
    out = [model(prompt, 0)]
    token, pos, tokens = int(out[0][-1].argmax()), prompt.numel(), []
    for _ in range(new):
        tokens.append(token)
        logits = model(torch.tensor([token]), pos, last_only=True)
        out.append(logits)
        token, pos = int(logits[-1].argmax()), pos + 1
    return torch.cat(out), tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_file(tmp_path_factory.mktemp("offload"), LAYERS, EXPERTS)
    model, _ = load_model(path, "cpu", torch.float32, ctx=CTX)
    return path, greedy(model)


def offloaded(path, **kw):
    def factory(file, model, device, dtype):
        opts = dict(n_slots=2 * LAYERS, router_weights=model.router_weights, progress=False)
        opts.update(kw)
        return OffloadedExperts(file, device, dtype, **opts)

    model, _ = load_model(path, "cpu", torch.float32, expert_backend_factory=factory, ctx=CTX)
    return model


def assert_same(ref, got, tol: float = CPU_KERNEL_TOL):
    ref_logits, ref_tokens = ref
    logits, tokens = got
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, rtol=tol, atol=tol)
