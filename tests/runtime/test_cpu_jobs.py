"""The CPU's share of a hybrid step started on the compiled kernel's own thread
(cpu_expert.start_expert, runtime/csrc/cpu_jobs.c): the same results as the direct calls,
the fallbacks where that thread cannot take the job, and the engine starting the CPU's work
before it issues the step's copies."""

from __future__ import annotations

import pytest
import torch

from formats.qtensor import QuantSpec
from runtime import cpu_expert, cpu_native
from runtime.cpu_expert import JOBS_ENV, cpu_expert_ffn, cpu_expert_hidden, start_expert
from runtime.offload import split as split_mod
from tests.runtime.kernel_cases import make_expert

from .offload_cases import LAYERS, assert_same, greedy, offloaded, tiny  # noqa: F401 (fixture)

needs_native = pytest.mark.skipif(cpu_native.native_kernel() is None, reason="no C compiler: the compiled kernel is not built")
SPECS = [QuantSpec(2, 16, 8, 128), QuantSpec(3, 64, 4, 4)]


def _expert(spec: QuantSpec, hidden: int = 64, inter: int = 256):
    layout, data, _ = make_expert(hidden, inter, spec, seed=7)
    x = 0.1 * torch.randn(1, hidden, generator=torch.Generator().manual_seed(3))
    return layout, torch.frombuffer(bytearray(data), dtype=torch.uint8), x


@needs_native
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_jobs_give_the_direct_calls_results(spec):
    """Whole experts and split rows, run on the kernel's thread: bit for bit what the direct
    calls give (the same one-call kernel), with the call's own time."""
    layout, record, x = _expert(spec)
    for first_row in (0, 64, 128):
        job = start_expert(record, layout, x, 2, first_row=first_row)
        assert job.on_thread
        h, seconds = job.result()
        assert torch.equal(h, cpu_expert_hidden(record, layout, x, 2, first_row)) and seconds > 0
        assert job.result()[0] is h  # waited for once
    job = start_expert(record, layout, x, 2, whole=True)
    assert job.on_thread and torch.equal(job.result()[0], cpu_expert_ffn(record, layout, x, 2))


@needs_native
def test_many_jobs_queued_at_once():
    """More jobs than the thread's queue holds (64): the rest run where they are asked for;
    every result is right, in any order of waiting."""
    layout, record, x = _expert(SPECS[0])
    want = cpu_expert_ffn(record, layout, x, 1)
    jobs = [start_expert(record, layout, x, 1, whole=True) for _ in range(80)]
    assert sum(j.on_thread for j in jobs) >= 64
    for j in reversed(jobs):
        assert torch.equal(j.result()[0], want)


def test_inline_where_the_thread_cannot_take_it(monkeypatch):
    """MOEPACK_CPU_WORKER=0, no compiled kernel, or a layout it declines: the job runs where
    its result is asked for, through the fallback chain, with the same result."""
    layout, record, x = _expert(SPECS[0])
    want = cpu_expert_hidden(record, layout, x, 1, 64)
    monkeypatch.setenv(JOBS_ENV, "0")
    ran = []
    real = cpu_expert.cpu_expert_hidden
    monkeypatch.setattr(cpu_expert, "cpu_expert_hidden", lambda *a: ran.append(1) or real(*a))
    job = start_expert(record, layout, x, 1, first_row=64)
    assert not job.on_thread and not ran  # not yet
    assert torch.equal(job.result()[0], want) and ran == [1]
    monkeypatch.delenv(JOBS_ENV)
    monkeypatch.setattr(cpu_expert, "_native", lambda: None)
    assert not start_expert(record, layout, x, 1, first_row=64).on_thread


@needs_native
def test_a_declined_x_falls_back_at_the_result():
    """A non-finite x is declined in C (int16 rounding needs a finite x): the fallback then
    propagates it as the reference does."""
    layout, record, x = _expert(SPECS[0])
    x[0, 3] = float("nan")
    job = start_expert(record, layout, x, 1, whole=True)
    assert job.on_thread  # queued: the kernel's check runs there
    y, _ = job.result()
    assert torch.isnan(y).any()
    torch.testing.assert_close(y, cpu_expert_ffn(record, layout, x, 1), equal_nan=True)


@pytest.mark.parametrize("on_thread", [True, False], ids=["thread", "inline"])
def test_cpu_starts_before_the_split_copies(tiny, monkeypatch, on_thread):  # noqa: F811
    """Each split expert's CPU job is started before its scratch copies are issued, and the
    tokens and logits are the resident model's, on the kernel's thread or inline."""
    if on_thread and cpu_native.native_kernel() is None:
        pytest.skip("no compiled CPU kernel here: jobs run inline")
    monkeypatch.setenv(JOBS_ENV, "1" if on_thread else "0")
    path, ref = tiny
    events = []
    real_start, real_copy = cpu_expert.start_expert, split_mod.SplitScratch.copy
    monkeypatch.setattr(cpu_expert, "start_expert", lambda *a, **kw: events.append("cpu") or real_start(*a, **kw))
    monkeypatch.setattr(split_mod.SplitScratch, "copy", lambda self, *a: events.append("copy") or real_copy(self, *a))
    model = offloaded(path, hybrid=True, cpu_threads=1, n_slots=2 * LAYERS)
    eng = model.experts
    forward = eng.forward
    eng.forward = lambda *a: events.append("step") or forward(*a)
    eng.cost.smoothing, eng.cost.cpu_s = 0.0, eng.cost.copy_s  # single misses are split
    events.clear()  # the calibration's jobs
    assert_same(ref, greedy(model))
    s = eng.stats()
    assert s["split_experts"] > 0 and s["cpu_calibration"]["on_thread"] is on_thread
    assert s["cpu_jobs_on_thread"] == (s["split_experts"] + s["cpu_experts"] if on_thread else 0)
    assert events.count("copy") == s["split_experts"] and events.count("cpu") == s["split_experts"] + s["cpu_experts"]
    steps = [part.split() for part in " ".join(events).split("step") if "copy" in part]
    assert steps and all(step.index("cpu") < step.index("copy") for step in steps)  # the CPU's jobs first


@needs_native
def test_a_dropped_job_is_waited_for_before_its_memory_goes():
    """A job dropped without its result (an exception between start and result) waits for the
    library's thread in its finaliser: that thread writes into the job and reads its tensors
    until it is done (freeing them first crashed the process)."""
    import gc

    layout, record, x = _expert(SPECS[0], hidden=256, inter=1024)
    want = cpu_expert_ffn(record, layout, x, 1)
    for _ in range(50):
        start_expert(record.clone(), layout, x.clone(), 1, whole=True)  # dropped at once
    gc.collect()
    assert torch.equal(start_expert(record, layout, x, 1, whole=True).result()[0], want)


@needs_native
def test_jobs_after_a_fork():
    """A child process has no copy of the library's thread: its first job starts one, and its
    later jobs wake that one (the condition variables copied from the parent still counted the
    parent's thread among their waiters: the child's second job hung)."""
    import os

    layout, record, x = _expert(SPECS[0])
    want = cpu_expert_ffn(record, layout, x, 1)
    assert torch.equal(start_expert(record, layout, x, 1, whole=True).result()[0], want)  # the parent's thread
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if its job ran and matched
        ok = all(torch.equal(start_expert(record, layout, x, 1, whole=True).result()[0], want) for _ in range(3))
        os._exit(0 if ok else 1)
    import signal
    import time

    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:  # a hung child (a queue lock inherited locked) fails the test, not CI
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's job never finished")
    assert os.WIFEXITED(done[1]) and os.WEXITSTATUS(done[1]) == 0
