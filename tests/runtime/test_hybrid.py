"""The copy-or-compute split of offload.hybrid.CostModel."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.offload.hybrid import CostModel


def test_split_balances_the_two_sides():
    m = CostModel(record_bytes=67_000_000, copy_gbps=53.6, cpu_s=0.0025, reuse_weight=0)  # a copy takes 1.25 ms
    assert m.split(0) == 0
    assert m.split(1) == 0  # 1.25 ms copying beats 2.5 ms on the CPU
    assert m.split(3) == 1  # 2 copies (2.5 ms) beside 1 CPU expert (2.5 ms)
    assert m.split(6) == 2  # 4 copies (5 ms) beside 2 CPU experts (5 ms)
    assert m.split(3, copy_backlog_s=0.01) == 3  # the link is busy for 10 ms: all on the CPU
    assert CostModel(67_000_000, 53.6, cpu_s=1.0).split(20) == 0


def test_an_uncached_expert_costs_a_share_of_a_copy():
    """A CPU slightly faster than the link does not take single misses (they would never be
    cached); one much faster still does."""
    m = CostModel(record_bytes=67_000_000, copy_gbps=53.6, cpu_s=0.0012)  # copy 1.25 ms
    assert m.split(1) == 0 and m.split(2) == 1
    assert CostModel(record_bytes=67_000_000, copy_gbps=53.6, cpu_s=0.0012, reuse_weight=0).split(1) == 1
    assert CostModel(record_bytes=67_000_000, copy_gbps=53.6, cpu_s=0.0006).split(1) == 1


@given(st.integers(0, 40), st.floats(1e-4, 1e-1), st.floats(1e-4, 1e-1), st.floats(0, 0.05), st.floats(0, 1))
def test_split_is_optimal(n, copy_s, cpu_s, backlog, reuse):
    m = CostModel(record_bytes=1000, copy_gbps=1000 / copy_s / 1e9, cpu_s=cpu_s, reuse_weight=reuse)
    c = m.split(n, backlog)
    cost = lambda c: max(backlog + (n - c) * m.copy_s, c * cpu_s) + c * reuse * m.copy_s  # noqa: E731
    assert 0 <= c <= n
    assert all(cost(c) <= cost(o) + 1e-12 for o in range(n + 1))


def test_running_averages():
    m = CostModel(record_bytes=1, cpu_s=0.010, smoothing=0.5)
    m.observe_cpu(0.002)
    assert abs(m.cpu_s - 0.006) < 1e-12
    m.observe_copy(0)  # no measurement: unchanged
    assert m.copy_gbps == 25.0


def test_assign_splits_single_misses_when_the_cpu_keeps_up():
    """One miss, CPU as fast as the link: w1/w3 on the CPU beside w2's copy (2/3 of either)
    beats copying it whole; a hopeless CPU copies everything; a free CPU takes everything."""
    m = CostModel(record_bytes=67_000_000, copy_gbps=53.6, cpu_s=0.00125)
    assert m.assign(1) == (0, 1, 0)
    assert m.assign(1, allow_split=False) == (1, 0, 0)
    assert CostModel(67_000_000, 53.6, cpu_s=1.0).assign(5) == (5, 0, 0)
    assert CostModel(67_000_000, 53.6, cpu_s=0.0).assign(3) == (0, 0, 3)


@given(st.integers(0, 8), st.floats(1e-4, 1e-1), st.floats(1e-4, 1e-1), st.floats(0, 0.05), st.floats(0, 1),
       st.floats(0.05, 0.95))
def test_assign_is_optimal(n, copy_s, cpu_s, backlog, reuse, share):
    m = CostModel(record_bytes=1000, copy_gbps=1000 / copy_s / 1e9, cpu_s=cpu_s, reuse_weight=reuse, w2_share=share)
    a, b, c = m.assign(n, backlog)
    assert min(a, b, c) >= 0 and a + b + c == n
    best = min(m.cost(x, y, n - x - y, backlog) for x in range(n + 1) for y in range(n - x + 1))
    assert m.cost(a, b, c, backlog) <= best + 1e-12


@given(st.lists(st.floats(0, 1), max_size=6), st.floats(1e-4, 1e-1), st.floats(1e-4, 1e-1), st.floats(0, 0.05),
       st.floats(0.05, 0.95))
def test_assign_with_reuse_values_is_optimal(values, copy_s, cpu_s, backlog, share):
    """Per-miss reuse values (sorted, most first): the copied misses are a prefix, and no
    prefix split of the rest does better."""
    values = sorted(values, reverse=True)
    n = len(values)
    m = CostModel(record_bytes=1000, copy_gbps=1000 / copy_s / 1e9, cpu_s=cpu_s, w2_share=share)
    a, b, c = m.assign(n, backlog, values=values)
    assert min(a, b, c) >= 0 and a + b + c == n
    best = min(m.cost(x, y, n - x - y, backlog, sum(values[x:])) for x in range(n + 1) for y in range(n - x + 1))
    assert m.cost(a, b, c, backlog, sum(values[a:])) <= best + 1e-12


def test_a_miss_worth_nothing_cached_goes_to_the_cpu():
    """Two misses, a CPU as fast as a copy: the one the cache would keep is copied and the one
    colder than everything cached (value 0) computed; two worth keeping are both copied."""
    m = CostModel(record_bytes=67_000_000, copy_gbps=53.6, cpu_s=67_000_000 / 53.6e9)
    assert m.assign(2, allow_split=False, values=[1.0, 0.0]) == (1, 0, 1)
    assert m.assign(2, allow_split=False, values=[1.0, 1.0]) == (2, 0, 0)
    assert m.assign(2, allow_split=False, values=[0.0, 0.0]) == (1, 0, 1)


def test_one_stalled_cpu_call_cannot_shut_the_cpu_out():
    """The CPU is measured only when it is used: an outlier that multiplied the estimate would
    stop every later CPU choice (seen on the H100 host, where a first call that compiled a GPU
    kernel was timed as CPU work). One observation moves the estimate at most OUTLIER_FACTOR-fold;
    a lasting slowdown still gets through."""
    from runtime.offload.hybrid import OUTLIER_FACTOR

    m = CostModel(record_bytes=64 << 20, copy_gbps=50.0, cpu_s=0.0005)
    assert m.assign(1, allow_split=False) == (0, 0, 1)  # a 0.5 ms CPU beats a 1.3 ms copy
    m.observe_cpu(1.3)  # one call stalled for seconds
    assert m.cpu_s <= 0.0005 * (1 + m.smoothing * (OUTLIER_FACTOR - 1)) + 1e-12
    for _ in range(10):
        m.observe_cpu(0.0005)
    assert m.assign(1, allow_split=False) == (0, 0, 1)  # the CPU is back in use
    for _ in range(40):
        m.observe_cpu(1.3)  # the CPU really is slow now
    assert m.cpu_s > 1.0 and m.assign(1, allow_split=False) == (1, 0, 0)


@given(st.integers(0, 4), st.integers(1, 4), st.integers(0, 4), st.floats(1e-4, 1e-2), st.floats(1e-4, 1e-2),
       st.floats(0, 0.02), st.sampled_from([0.0, 0.25, 0.5, 1.0]), st.floats(0.1, 0.6))
def test_gpu_rows_balance_the_link_and_the_cpu(a, b, c, copy_s, cpu_s, backlog, cap, share):
    """The GPU's share of each split expert's w1/w3 rows minimises max(link, CPU) over
    [0, max_gpu_rows]: both sides finish together unless the share sits at a bound."""
    m = CostModel(record_bytes=1000, copy_gbps=1000 / copy_s / 1e9, cpu_s=cpu_s, w2_share=share, max_gpu_rows=cap)
    f = share

    def sides(r):
        return (backlog + a * copy_s + b * (f + r * (1 - f)) * copy_s, b * (1 - r) * (1 - f) * cpu_s + c * cpu_s)

    r = m.gpu_rows(a, b, c, backlog)
    assert 0 <= r <= cap
    t = max(sides(r))
    assert all(t <= max(sides(o * cap / 20)) + 1e-12 for o in range(21))
    if 0 < r < cap:
        link, cpu = sides(r)
        assert abs(link - cpu) <= 1e-9
    assert m.cost(a, b, c, backlog, 0.0) == pytest.approx(t, rel=1e-12)  # the objective charges splits at this share


def test_the_row_split_takes_a_miss_the_fixed_cut_leaves_on_the_link():
    """A CPU expert at 2 copies' time: the fixed cut (w1/w3 all on the CPU, 1.33 copies) loses a
    single miss to the link; half of w1/w3 on the GPU makes both sides 0.67 copies and wins."""
    fixed = CostModel(record_bytes=1000, copy_gbps=1.0, cpu_s=2e-6, reuse_weight=0.25)
    rows = CostModel(record_bytes=1000, copy_gbps=1.0, cpu_s=2e-6, reuse_weight=0.25, max_gpu_rows=0.5)
    assert fixed.assign(1) == (1, 0, 0)
    assert rows.assign(1) == (0, 1, 0) and rows.gpu_rows(0, 1, 0) == 0.5


@given(st.integers(0, 3), st.integers(1, 4), st.integers(0, 3), st.integers(0, 4), st.floats(1e-4, 1e-2),
       st.floats(1e-4, 1e-2), st.floats(0, 0.02), st.sampled_from([0.0, 0.25, 0.5]), st.floats(0.1, 0.6))
def test_staged_splits_balance_without_their_w2(a, b, s, c, copy_s, cpu_s, backlog, cap, share):
    """s of b splits have their w2 staged ahead: the link carries only their GPU rows, and the
    share still minimises max(link, CPU)."""
    s = min(s, b)
    m = CostModel(record_bytes=1000, copy_gbps=1000 / copy_s / 1e9, cpu_s=cpu_s, w2_share=share, max_gpu_rows=cap)
    f = share

    def sides(r):
        return (backlog + a * copy_s + ((b - s) * f + b * r * (1 - f)) * copy_s,
                b * (1 - r) * (1 - f) * cpu_s + c * cpu_s)

    r = m.gpu_rows(a, b, c, backlog, staged=s)
    assert 0 <= r <= cap
    t = max(sides(r))
    assert all(t <= max(sides(o * cap / 20)) + 1e-12 for o in range(21))
    assert m.cost(a, b, c, backlog, 0.0, staged=s) == pytest.approx(t, rel=1e-12)
    assert m.cost(a, b, c, backlog, 0.0, staged=s) <= m.cost(a, b, c, backlog, 0.0) + 1e-15  # never dearer


@given(st.lists(st.floats(0, 1), max_size=4), st.floats(0, 1), st.floats(1e-4, 1e-1), st.floats(1e-4, 1e-1),
       st.floats(0, 0.05), st.floats(0.05, 0.95), st.sampled_from([0.0, 0.5]))
def test_assign_staged_is_optimal(values, staged_value, copy_s, cpu_s, backlog, share, cap):
    """The staged miss copied, split (w2 already sent) or computed, the others as in assign:
    no combination does better."""
    values = sorted(values, reverse=True)
    n = len(values)
    m = CostModel(record_bytes=1000, copy_gbps=1000 / copy_s / 1e9, cpu_s=cpu_s, w2_share=share, max_gpu_rows=cap)
    role, (a, b, c) = m.assign_staged(n, staged_value, backlog, values)
    assert min(a, b, c) >= 0 and a + b + c == n and role in ("copy", "split", "cpu")

    def cost(role, x, y):
        p = {"copy": (1, 0, 0), "split": (0, 1, 0), "cpu": (0, 0, 1)}[role]
        return m.cost(x + p[0], y + p[1], n - x - y + p[2], backlog,
                      sum(values[x:]) + (0.0 if role == "copy" else staged_value), staged=p[1])

    best = min(cost(r, x, y) for r in ("copy", "split", "cpu") for x in range(n + 1) for y in range(n - x + 1))
    assert cost(role, a, b) <= best + 1e-12


def test_a_staged_w2_turns_a_copy_into_a_split():
    """A CPU expert at 2 copies' time, any share of w1/w3 rows allowed on the GPU, a miss worth
    half a copy cached. Split, it costs the link w2 + r of w1/w3 and the CPU the rest:
    balanced at r = 1/2, 2/3 copy, plus the half copy it is worth cached, loses to a copy
    (1). With w2 staged the link carries only rows: balanced at r = 2/3, 4/9 copy, and the
    split wins."""
    m = CostModel(record_bytes=1000, copy_gbps=1.0, cpu_s=2e-6, w2_share=1 / 3, max_gpu_rows=1.0)
    assert m.assign(1, values=[0.5]) == (1, 0, 0)
    assert m.gpu_rows(0, 1, 0) == pytest.approx(0.5)
    assert m.assign_staged(0, 0.5) == ("split", (0, 0, 0))
    assert m.gpu_rows(0, 1, 0, staged=1) == pytest.approx(2 / 3)
    assert m.cost(0, 1, 0, 0.0, 0.5, staged=1) == pytest.approx((4 / 9 + 0.5) * m.copy_s)
    m.cpu_s = 1.0  # a hopeless CPU: the staged bytes are written off, the miss copied
    assert m.assign_staged(0, 0.5) == ("copy", (0, 0, 0))
