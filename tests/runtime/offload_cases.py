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


def offloaded(path, dtype: torch.dtype = torch.float32, **kw):
    def factory(file, model, device, dtype):
        opts = dict(n_slots=2 * LAYERS, router_weights=model.router_weights, progress=False)
        opts.update(kw)
        return OffloadedExperts(file, device, dtype, **opts)

    model, _ = load_model(path, "cpu", dtype, expert_backend_factory=factory, ctx=CTX)
    return model


# half-precision runs against the resident model in the same dtype: each expert's output is
# rounded to it, and the CPU kernel's integer activations add CPU_KERNEL_TOL (dev-cpu, 3 layers:
# at most 0.004 apart in float16, 0.023 in bfloat16, on logits up to 4.4)
HALF_TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


def assert_same(ref, got, tol: float = CPU_KERNEL_TOL):
    ref_logits, ref_tokens = ref
    logits, tokens = got
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, rtol=tol, atol=tol)


# Hybrid modes forced through the cost model (smoothing off): a CPU as fast as the link splits
# single misses (w1/w3 on the CPU, w2 copied), one at half its speed splits by rows, a free CPU
# takes whole experts, and staged splits with w2 queued a layer early (--prefetch-w2).
HYBRID_MODES = ("split", "rows", "cpu", "staged")


def hybrid_kw(mode: str) -> dict:
    """OffloadedExperts keywords of a hybrid mode, beside hybrid=True."""
    return dict(stage_w2=True, prefetch=0) if mode == "staged" else {}


def force_hybrid_mode(model, mode: str) -> None:
    cost = model.experts.cost
    cost.smoothing = 0.0
    cost.cpu_s = {"split": cost.copy_s, "rows": 2 * cost.copy_s, "cpu": 0.0, "staged": cost.copy_s}[mode]


def assert_hybrid_mode_ran(model, mode: str) -> None:
    s = model.experts.stats()
    assert (s["split_experts"] if mode != "cpu" else s["cpu_experts"]) > 0
    if mode == "staged":
        assert s["staged_w2"]["used"] > 0
    else:
        assert (s["split_gpu_row_share"] > 0) == (mode == "rows")
