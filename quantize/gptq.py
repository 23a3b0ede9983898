"""Codes by GPTQ for fixed scale and zero: `moe-pack quantize --gptq TEXT`.

quantize/fit.py rounds every weight to its nearest code, weighing the columns by E[x_j^2]
alone. A layer's output error is (W - What) X, and with correlated input columns the rounding
error of one column can be cancelled in part by nudging the columns not yet rounded: GPTQ
(Frantar et al., 2022) does exactly that, column by column, with the inverse of the inputs'
Gram matrix H = sum_t x_t x_t^T (one [cols, cols] matrix per input, quantize/gptq_calibration.py).

Here the scale and zero of every group are fixed before GPTQ runs: the importance-weighted
fit's, already stored as the file's 4- or 8-bit meta codes and decoded. So GPTQ only chooses
the codes, the file's layout does not change, and the stored scale/zero are the ones the codes
were chosen for (nothing rounds after it). Columns are taken in order of decreasing H_jj
("act order"), which fixed groups allow at no cost in the file.

Deterministic on one device at one thread count: the same float32 operations in the same order.
"""

from __future__ import annotations

import torch

from formats.errors import MoepackError

DAMP = 0.01  # of the mean diagonal, added to H's diagonal: GPTQ's default
BLOCK = 128  # columns updated together before the rest of the matrix ("lazy batch" updates)


def _upper_inverse_factor(H: torch.Tensor) -> torch.Tensor:
    """H [C, C] (symmetric, positive semi-definite, float32; overwritten) -> U upper with
    U^T U = (H + damp I)^-1.

    More damping where H + damp I is still not positive definite to float32 (a rank-poor H
    from few calibration rows). Temporaries: H, one factor and U (~3 H; for Mixtral's w2, H
    is 0.8 GB)."""
    diag = torch.diagonal(H)  # a view: the damping goes in place
    mean_diag = float(diag.mean())
    damp = DAMP * (mean_diag if mean_diag > 0 else 1.0)
    added = 0.0
    for _ in range(8):
        diag += damp - added
        added = damp
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            inv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(inv, upper=True)
            del inv
            if int(info) == 0:
                return U
        damp *= 10
    raise MoepackError("the calibration inputs' Gram matrix is not positive definite even with damping",
                       hint="the --gptq text or the checkpoint has non-finite values; check both")


def gptq_codes(W: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
               group_size: int) -> torch.Tensor:
    """W [rows, cols] (float, on the device to run on), H [cols, cols] the Gram matrix of the
    matrix's inputs, scale and zero [rows, cols // group_size] the decoded values the file
    stores -> codes q [rows, cols] u8 with W ~ (q - zero) * scale.

    Columns no input ever drove (H_jj = 0) round to nearest: their error reaches no output."""
    rows, cols = W.shape
    top = float((1 << bits) - 1)
    dev = W.device
    H = H.to(device=dev, dtype=torch.float32)
    if not bool(torch.isfinite(H).all()):  # cuSOLVER may factor NaN without a complaint
        raise MoepackError("the calibration inputs' Gram matrix has non-finite values",
                           hint="the --gptq text drives some layer to inf or NaN; check the checkpoint")
    d = torch.diagonal(H)
    perm = torch.argsort(torch.where(d == 0, torch.ones_like(d), d), descending=True, stable=True)
    Hp = H.index_select(0, perm).index_select(1, perm)  # a copy: the caller's H stays as it was
    dp = torch.diagonal(Hp)
    # off-diagonals of a never-driven column are 0 too: with 1 on its diagonal it passes no error on
    dp.copy_(torch.where(dp == 0, torch.ones_like(dp), dp))
    U = _upper_inverse_factor(Hp)
    del Hp
    group_of = (perm // group_size).tolist()  # the group of each column, in GPTQ's order
    # transposed, so that a column of W, and a group's scales, are contiguous rows
    Wt = W.to(torch.float32).T[perm].contiguous()  # [cols, rows]
    s_all = scale.to(device=dev, dtype=torch.float32).T.contiguous()  # [groups, rows]
    z_all = zero.to(device=dev, dtype=torch.float32).T.contiguous()
    inv_all = torch.where(s_all == 0, torch.ones_like(s_all), s_all)
    Q = torch.empty((cols, rows), dtype=torch.uint8, device=dev)
    err = torch.empty((BLOCK, rows), dtype=torch.float32, device=dev)
    for i1 in range(0, cols, BLOCK):
        i2 = min(i1 + BLOCK, cols)
        for j in range(i1, i2):
            g = group_of[j]
            w = Wt[j]
            q = torch.round(w / inv_all[g] + z_all[g]).clamp_(0, top)
            Q[j] = q.to(torch.uint8)
            e = err[j - i1]
            torch.div(w - (q - z_all[g]) * s_all[g], U[j, j], out=e)
            Wt[j + 1:i2] -= U[j, j + 1:i2, None] * e[None, :]
        Wt[i2:] -= U[i1:i2, i2:].T @ err[:i2 - i1]
    out = torch.empty_like(Q)
    out[perm] = Q
    return out.T.contiguous()
