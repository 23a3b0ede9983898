"""Scale and zero by importance-weighted least squares: `moe-pack quantize --imatrix`.

HQQ fits each group's zero to an l_p (p < 1) error of the weights themselves, every weight
alike. A layer's output feels y_i = sum_j W_ij x_j, and with the columns of x uncorrelated
the expected squared error of y_i is sum_j E[x_j^2] (W_ij - What_ij)^2: a column that the
activations drive hard should be matched closely, one they hardly touch matters little. The
importance matrix (quantize/imatrix.py) holds E[x_j^2] for every matrix's columns.

Per group of g weights x with importances a, this fits W ~ s * L + m (codes L in 0 ..
2^bits - 1): for each of STEPS candidate scales around the min-max one, round the codes,
solve the 2x2 weighted least squares for (s, m) given them, round again and solve again,
and keep the candidate of least weighted error. The scheme is the one llama.cpp's k-quants
use with an importance matrix. Returned in HQQ's convention, W ~ (q - zero) * scale with
zero = -m / s, so the file's layout and the runtime do not change.

Deterministic: elementwise float32 ops and sums over each group's own g values, which one
thread takes; the same input gives the same bytes at any thread count.
"""

from __future__ import annotations

import torch

from .encode import CHUNK

# Candidate scales (max - min) / (2^bits - 1 + d), d evenly from STEP_LO to STEP_HI
STEPS = 16
STEP_LO, STEP_HI = -0.5, 1.5
REFITS = 2  # least-squares solves per candidate, each after rounding to the last one's (s, m)
# Each column's importance, in units of the matrix's mean, is raised by this much
IMPORTANCE_FLOOR = 0.1


def _solve(x: torch.Tensor, a: torch.Tensor, codes: torch.Tensor, s: torch.Tensor, m: torch.Tensor,
           sa: torch.Tensor, sax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (s, m) minimising sum a (x - s L - m)^2 for codes L, per group ([..., 1] each);
    the previous (s, m) where the codes are all alike or the solution's scale is not positive."""
    sal = (a * codes).sum(-1, keepdim=True)
    sall = (a * codes * codes).sum(-1, keepdim=True)
    saxl = (a * x * codes).sum(-1, keepdim=True)
    det = sa * sall - sal * sal
    ok = det > 0
    safe = torch.where(ok, det, torch.ones_like(det))
    s_new = (sa * saxl - sal * sax) / safe
    m_new = (sall * sax - sal * saxl) / safe
    good = ok & (s_new > 0)
    return torch.where(good, s_new, s), torch.where(good, m_new, m)


def _fit_groups(x: torch.Tensor, a: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [R, G, g] weights, a [1 or R, G, g] importances (> 0) -> codes u8 [R, G, g], scale and
    zero [R, G, 1] (x ~ (codes - zero) * scale)."""
    top = float((1 << bits) - 1)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    rng = hi - lo
    flat = rng <= 0
    rng = torch.where(flat, torch.ones_like(rng), rng)
    a = a.expand_as(x)
    sa = a.sum(-1, keepdim=True)
    sax = (a * x).sum(-1, keepdim=True)
    best_e = torch.full_like(lo, float("inf"))
    best_s, best_m = rng / top, lo.clone()
    for i in range(STEPS):
        s = rng / (top + (STEP_LO + (STEP_HI - STEP_LO) * i / (STEPS - 1)))
        m = lo
        for _ in range(REFITS):
            codes = torch.round((x - m) / s).clamp_(0, top)
            s, m = _solve(x, a, codes, s, m, sa, sax)
        codes = torch.round((x - m) / s).clamp_(0, top)
        d = x - (s * codes + m)
        e = (a * d * d).sum(-1, keepdim=True)
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
    # a group of one value v: v = s * top with zero 0, or v = -s * top with zero = top (codes
    # 0), keeping zero inside the codes' range as the others are, for the zeros' meta codes
    v = lo
    best_s = torch.where(flat, torch.where(v != 0, v.abs() / top, torch.ones_like(v)), best_s)
    best_m = torch.where(flat, torch.where(v < 0, v, torch.zeros_like(v)), best_m)
    codes = torch.round((x - best_m) / best_s).clamp_(0, top)
    return codes.to(torch.uint8), best_s, -best_m / best_s


def weighted_fit(W: torch.Tensor, importance: torch.Tensor | None, bits: int, group_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [rows, cols] (any float dtype, on the device to fit on), importance [cols] (E[x^2] of
    each column's input, >= 0; None: all alike) -> codes q [rows, cols] u8 and per-group scale,
    zero [rows * cols // group_size] f32, W ~ (q - zero) * scale (hqq_codec.hqq_tensors' form)."""
    rows, cols = W.shape
    g = group_size
    groups = cols // g
    if importance is None:
        a = torch.ones((1, groups, g), dtype=torch.float32, device=W.device)
    else:
        imp = importance.to(device=W.device, dtype=torch.float32).reshape(1, groups, g)
        mean = imp.mean()
        if bool(torch.isfinite(mean)) and float(mean) > 0:
            # relative to the mean: the sums stay far from float32's ends whatever x's scale;
            # and no column weighs nothing: with all of a group's weight on a few columns the
            # others would round anywhere, and an input seen rarely in calibration may matter later
            a = imp / mean + IMPORTANCE_FLOOR
        else:  # nothing measured (or damaged): all alike
            a = torch.ones((1, groups, g), dtype=torch.float32, device=W.device)
    q = torch.empty((rows, cols), dtype=torch.uint8, device=W.device)
    scale = torch.empty((rows, groups), dtype=torch.float32, device=W.device)
    zero = torch.empty_like(scale)
    step = max(1, CHUNK // max(1, cols))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        x = W[r0:r1].to(torch.float32).view(r1 - r0, groups, g)
        codes, s, z = _fit_groups(x, a, bits)
        q[r0:r1] = codes.view(r1 - r0, cols)
        scale[r0:r1], zero[r0:r1] = s.view(r1 - r0, groups), z.view(r1 - r0, groups)
    return q, scale.view(-1), zero.view(-1)
