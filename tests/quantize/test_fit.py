"""quantize/fit.py: the importance-weighted least-squares fit of scale and zero."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantize.fit import weighted_fit
from quantize.hqq_codec import hqq_tensors
from formats.qtensor import QuantSpec
from tests.quantize.helpers import one_torch_thread  # noqa: F401 (autouse fixture)


def _decode(q, scale, zero, g):
    rows, cols = q.shape
    return ((q.float().view(rows, -1, g) - zero.view(rows, -1, 1)) * scale.view(rows, -1, 1)).view(rows, cols)


def _case(rows=64, cols=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen) * 0.02
    # activations: a few columns driven 30x harder than the rest, as real layers' inputs are
    x = torch.randn(512, cols, generator=gen) * torch.where(torch.rand(cols, generator=gen) < 0.05, 30.0, 1.0)
    return W, x


@pytest.mark.parametrize("bits,g", [(2, 16), (3, 64), (4, 64)])
def test_codes_in_range_and_the_form_hqq_gives(bits, g):
    W, _ = _case()
    q, scale, zero = weighted_fit(W, None, bits, g)
    assert q.dtype == torch.uint8 and q.shape == W.shape and int(q.max()) <= (1 << bits) - 1
    assert scale.shape == zero.shape == (W.numel() // g,) and bool((scale > 0).all())
    hq, hs, hz = hqq_tensors(W, QuantSpec(bits, g, 16, 0), "cpu")
    assert (hq.shape, hs.shape, hz.shape) == (q.shape, scale.shape, zero.shape)


@pytest.mark.parametrize("bits,g", [(2, 16), (3, 64)])
def test_weighted_fit_cuts_the_output_error_below_hqqs(bits, g):
    """What the importance is for: ||x W^T - x What^T|| on the calibration inputs."""
    W, x = _case()
    imp = (x * x).mean(0)
    hq, hs, hz = hqq_tensors(W, QuantSpec(bits, g, 16, 0), "cpu")
    err = {}
    for name, (q, s, z) in {"hqq": (hq, hs, hz), "uniform": weighted_fit(W, None, bits, g),
                            "imatrix": weighted_fit(W, imp, bits, g)}.items():
        err[name] = float((x @ (W - _decode(q, s, z, g)).T).norm())
    assert err["imatrix"] < 0.8 * err["hqq"], err
    assert err["imatrix"] < err["uniform"], err


def test_uniform_fit_has_less_squared_error_than_min_max_rounding():
    W, _ = _case(seed=3)
    q, s, z = weighted_fit(W, None, 2, 16)
    x = W.view(-1, 16)
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    step = (hi - lo) / 3
    naive = torch.round((x - lo) / step).clamp(0, 3) * step + lo
    assert float((W - _decode(q, s, z, 16)).square().sum()) < float((x - naive).square().sum())


@pytest.mark.parametrize("value", [0.0, 0.5, -0.25])
def test_a_group_of_one_value_decodes_exactly_with_zero_in_the_codes_range(value):
    W = torch.randn(2, 32) * 0.1
    W[0, :16] = value
    q, s, z = weighted_fit(W, None, 2, 16)
    assert torch.equal(_decode(q, s, z, 16)[0, :16], torch.full((16,), value))
    assert 0 <= float(z[0]) <= 3 and float(s[0]) > 0


def test_same_bytes_at_any_thread_count():
    W, x = _case(rows=300, cols=512, seed=5)
    imp = (x * x).mean(0)
    torch.set_num_threads(1)
    one = weighted_fit(W, imp, 2, 16)
    torch.set_num_threads(2)
    two = weighted_fit(W, imp, 2, 16)
    torch.set_num_threads(1)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_a_column_that_no_input_drives_still_gets_fitted(monkeypatch):
    """The floor: with a zero importance, a column is still matched by least squares, not left
    to where the driven columns' fit puts it (or, for a group no input drives, to min-max)."""
    import quantize.fit as fit

    W, _ = _case(rows=8, cols=64, seed=7)
    imp = torch.zeros(64)
    imp[:8] = 1.0

    def undriven_error():
        q, s, z = weighted_fit(W, imp, 2, 16)
        return float((W - _decode(q, s, z, 16))[:, 16:].square().sum())

    with_floor = undriven_error()
    monkeypatch.setattr(fit, "IMPORTANCE_FLOOR", 0.0)
    assert with_floor < undriven_error()


def test_importances_count_relative_to_their_mean():
    """Only the importances' shape matters, not their scale (E[x^2] of a layer may be 1e-6 or
    1e6); none measured at all is equal weights."""
    W, x = _case(seed=11)
    imp = (x * x).mean(0)
    base = weighted_fit(W, imp, 2, 16)
    for factor in (1e-30, 1e20):
        q, s, z = weighted_fit(W, imp * factor, 2, 16)
        assert float((q.int() - base[0].int()).abs().float().mean()) < 1e-3
    assert all(torch.equal(a, b) for a, b in zip(weighted_fit(W, torch.zeros(256), 2, 16), weighted_fit(W, None, 2, 16)))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.sampled_from([(2, 16), (3, 16), (4, 32)]), st.integers(0, 2**31 - 1),
       st.floats(1e-6, 1e3))
def test_error_never_beyond_half_a_step_of_the_min_max_grid(rows, bg, seed, amp):
    """Any weights: every weight decodes within the group's range, the fit never worse than
    the plain min-max grid by more than rounding."""
    bits, g = bg
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, 2 * g, generator=gen) * amp
    imp = torch.rand(2 * g, generator=gen)
    q, s, z = weighted_fit(W, imp, bits, g)
    What = _decode(q, s, z, g).view(-1, g)
    x = W.view(-1, g)
    top = (1 << bits) - 1
    half_step = (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / top / 2
    assert bool(torch.isfinite(What).all())
    a = imp.view(-1, g).repeat(rows, 1) / imp.mean() + 0.1
    mm = torch.round((x - x.amin(1, keepdim=True)) / (2 * half_step).clamp_min(1e-30)).clamp(0, top) * 2 * half_step \
        + x.amin(1, keepdim=True)
    fit_err = (a * (x - What) ** 2).sum(1)
    mm_err = (a * (x - mm) ** 2).sum(1)
    assert bool((fit_err <= mm_err * (1 + 1e-4) + 1e-12 * amp * amp).all())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_fit_on_cuda_matches_the_cpu():
    """quantize --device cuda runs the fit where the weights are: the same codes but for the
    odd tie that float32 rounding on another device breaks the other way."""
    W, x = _case(rows=512, cols=1024, seed=13)
    imp = (x * x).mean(0)
    cpu = weighted_fit(W, imp, 2, 16)
    gpu = [t.cpu() for t in weighted_fit(W.cuda(), imp.cuda(), 2, 16)]
    assert float((cpu[0] != gpu[0]).float().mean()) < 1e-3
    assert float(((gpu[1] - cpu[1]).abs() > 1e-4 * cpu[1]).float().mean()) < 1e-3
