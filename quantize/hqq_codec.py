"""One matrix -> its .moepack bytes with HQQ (or, given an importance matrix, quantize/fit.py),
plus the relative error of what is stored.

HQQ finds the codes and the per-group float scale/zero; `quantize.encode` lays them out on
the same device, as `formats.qtensor.encode_matrix` defines (and, with 4- or 8-bit meta,
quantizes scale and zero itself: hqq 0.2.x ignores its own meta-quantization options). The
recorded error is measured on the stored bytes, so it includes the meta quantization: it is
the error a runtime will actually see.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from formats.errors import MoepackError, SourceError
from formats.qtensor import QuantSpec, encode_matrix

from .encode import CHUNK, encode_codes, stored_error, stored_meta
from .fit import weighted_fit
from .gptq import gptq_codes

# Weights per hqq call on the CPU (hqq_tensors): 4 MiB of float32 per temporary
HQQ_CPU_BLOCK = 1 << 20


def hqq_tensors(W: torch.Tensor, spec: QuantSpec, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ codes q [rows, cols] u8 and per-group scale, zero [rows * cols // g] f32 on `device`,
    W ~ (q - zero) * scale.

    On the CPU hqq runs on blocks of HQQ_CPU_BLOCK weights (whole rows) one after another: its
    optimizer makes several float32 temporaries of its input's size at each of up to 20 steps;
    for a whole Mixtral expert matrix (235 MB each) those went to DRAM and to page faults
    (glibc maps every allocation that large afresh), while a block's stay in cache: 2.8x
    faster at half the peak memory (docs/BENCHMARKS.md section 25). Groups lie inside rows,
    so a block's groups get what the whole matrix would, except where hqq's early stop (the
    first step whose mean error over its input does not improve) falls on another step for
    the block than for the matrix. On CUDA the matrix is one call."""
    from hqq.core.quantize import Quantizer

    rows, cols = W.shape
    step = rows if device.startswith("cuda") else max(1, HQQ_CPU_BLOCK // cols)
    q = torch.empty((rows, cols), dtype=torch.uint8, device=device)
    scale = torch.empty(rows * cols // spec.group_size, dtype=torch.float32, device=device)
    zero = torch.empty_like(scale)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        g0, g1 = r0 * cols // spec.group_size, r1 * cols // spec.group_size
        # axis=1 with group_size g groups g consecutive elements of the row-major matrix, i.e. g
        # consecutive columns of one row (g divides cols): exactly the format's groups.
        W_q, meta = Quantizer.quantize(
            W[r0:r1].to(device), nbits=spec.bits, group_size=spec.group_size, axis=1, optimize=True, bitpack=False,
            device=device,
        )
        q[r0:r1] = W_q.reshape(r1 - r0, cols)  # W_q: [block groups, g], integer-valued floats
        scale[g0:g1] = meta["scale"].reshape(-1)
        zero[g0:g1] = meta["zero"].reshape(-1)
    return q, scale, zero


def hqq_quantize(W: torch.Tensor, spec: QuantSpec, device: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """hqq_tensors as host numpy arrays."""
    return tuple(t.cpu().numpy() for t in hqq_tensors(W, spec, device))


def _float32(block) -> np.ndarray:
    if isinstance(block, torch.Tensor):
        return block.to(torch.float32).numpy()  # via torch: numpy has no bfloat16
    return np.asarray(block, dtype=np.float32)


def relative_error(W, approx: np.ndarray) -> float:
    """||W - approx||_F / ||W||_F, in row chunks (W: torch tensor or array of any float dtype).

    0 for an all-zero W stored exactly, 1 for an all-zero W stored as anything else.
    """
    rows = W.shape[0] if len(W.shape) > 1 else 1
    W2 = W.reshape(rows, -1)
    A2 = approx.reshape(rows, -1)
    step = max(1, CHUNK // max(1, W2.shape[1]))
    err2 = norm2 = 0.0
    for i in range(0, rows, step):
        w = _float32(W2[i : i + step]).ravel()
        d = w - A2[i : i + step].astype(np.float32, copy=False).ravel()
        err2 += float(np.dot(d.astype(np.float64), d))  # float64 accumulation across chunks and within them
        norm2 += float(np.dot(w.astype(np.float64), w))
    if norm2 == 0.0:
        return 0.0 if err2 == 0.0 else 1.0
    return float(np.sqrt(err2 / norm2))


def _encode(label: str, spec: QuantSpec, device: str = "cpu", weighted: bool = False, **arrays) -> bytes:
    try:
        return encode_matrix(spec, **arrays)
    except SourceError as e:
        hint = e.hint
        # hqq's zero = -min / scale can pass 65504 on flat groups: on CUDA its optimizer works in
        # float16 whatever the stored meta, elsewhere only 16-bit meta stores it as float16
        if spec.quantized and weighted:  # the weighted fit works in float32 on any device
            hint = ("this tensor's scale/zero from the weighted fit do not fit float16; use --meta-bits 8"
                    if spec.meta_bits == 16 else "quantize this checkpoint without --imatrix or --gptq")
        elif spec.quantized and device.startswith("cuda"):
            hint = "hqq works in float16 on the GPU, where this tensor's scale/zero overflow; use --device cpu"
        elif spec.quantized and spec.meta_bits == 16:
            hint = "hqq's scale/zero for this tensor do not fit float16; use --meta-bits 8 (float32 ranges)"
        raise SourceError(f"tensor {label}: {e.message}", hint=hint) from None


@dataclass(frozen=True)
class Weighted:
    """encode_tensor's fit by importance-weighted least squares (quantize/fit.py) instead of
    HQQ: `importance` [cols] the E[x^2] of the matrix's input columns, or None (all alike).
    With `gram` (the inputs' sum of x x^T [cols, cols]), the codes for that scale and zero
    are then chosen by GPTQ (quantize/gptq.py) instead of rounded to nearest."""

    importance: np.ndarray | None
    gram: torch.Tensor | None = None


def encode_tensor(W: torch.Tensor, spec: QuantSpec, device: str, label: str,
                  fit: Weighted | None = None) -> tuple[bytes, float]:
    """The bytes of `W` stored as `spec`, and their relative error against `W`: codes, scale
    and zero from HQQ, or from `fit`.

    `label` names the tensor in errors (non-finite weights, out of GPU memory).
    """
    if not torch.isfinite(W).all():
        raise SourceError(f"tensor {label} contains NaN or infinite values", hint="the checkpoint is damaged; download it again")
    if not spec.quantized:
        w16 = W.to(torch.float16)  # no copy when the checkpoint is fp16 already
        if not torch.isfinite(w16).all():
            raise SourceError(
                f"tensor {label} has values beyond float16's range (|w| > 65504)",
                hint="this tensor cannot be stored as float16 in format v1",
            )
        w16_np = w16.numpy()
        return _encode(label, spec, weight=w16_np), relative_error(W, w16_np)
    try:
        Wd = W.to(device)  # one copy on the device for hqq, the re-rounding and the error check
        if fit is None:
            q, scale, zero = hqq_tensors(Wd, spec, device)
        else:
            imp = None if fit.importance is None else torch.from_numpy(fit.importance)
            q, scale, zero = weighted_fit(Wd, imp, spec.bits, spec.group_size)
            if fit.gram is not None:
                s_hat, z_hat = stored_meta(scale, zero, spec)
                groups = Wd.shape[1] // spec.group_size
                q = gptq_codes(Wd, fit.gram, s_hat.view(-1, groups), z_hat.view(-1, groups), spec.bits,
                               spec.group_size)
        buf = encode_codes(Wd, q, scale, zero, spec, refit=fit is None or fit.gram is None)
        if buf is None:  # a component is not finite: the numpy reference names it and refuses
            payload = _encode(label, spec, device, fit is not None, q=q.cpu().numpy(), scale=scale.cpu().numpy(),
                              zero=zero.cpu().numpy())
            buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
        del q, scale, zero
        return buf.cpu().numpy().tobytes(), stored_error(Wd, buf, spec)
    except torch.OutOfMemoryError:
        raise MoepackError(f"out of GPU memory quantizing {label}", hint="close other GPU programs, or use --device cpu") from None
