"""One matrix -> its .moepack bytes with HQQ, plus the relative error of what is stored.

HQQ finds the codes and the per-group float scale/zero; `formats.qtensor.encode_matrix`
lays them out (and, with 8-bit meta, quantizes scale and zero itself: hqq 0.2.x ignores
its own meta-quantization options). The recorded error is measured on the decoded bytes,
so it includes the meta quantization: it is the error a runtime will actually see.
"""

from __future__ import annotations

import numpy as np
import torch

from formats.errors import MoepackError, SourceError
from formats.qtensor import QuantSpec, component_views, decode_matrix, encode_matrix, encode_meta


def hqq_quantize(W: torch.Tensor, spec: QuantSpec, device: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HQQ codes q [rows, cols] u8 and per-group scale, zero [rows * cols // g] f32, W ~ (q - zero) * scale."""
    from hqq.core.quantize import Quantizer

    rows, cols = W.shape
    # axis=1 with group_size g groups g consecutive elements of the row-major matrix, i.e. g
    # consecutive columns of one row (g divides cols): exactly the format's groups.
    W_q, meta = Quantizer.quantize(
        W.to(device), nbits=spec.bits, group_size=spec.group_size, axis=1, optimize=True, bitpack=False, device=device,
    )
    q = W_q.reshape(rows, cols).to("cpu", torch.uint8).numpy()  # W_q: [rows * cols // g, g], integer-valued floats
    scale = meta["scale"].reshape(-1).to("cpu", torch.float32).numpy()
    zero = meta["zero"].reshape(-1).to("cpu", torch.float32).numpy()
    return q, scale, zero


def refit_codes(W: torch.Tensor, spec: QuantSpec, q: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                device: str) -> np.ndarray:
    """HQQ's codes `q` re-rounded to the scale and zero the file will hold: clip(round(W / s + z)).

    HQQ fits its codes to float16 scale/zero. Storing those as 4- or 8-bit codes moves them a
    little, and every weight's nearest code moves with them. Re-rounding makes each code the
    nearest to what the runtime decodes: 4-bit meta then costs ~1% relative weight error over
    fp16 meta instead of ~1.5% (BENCHMARKS.md section 10). With 8-bit meta the gain is below
    1e-4, so those files keep hqq's codes exactly. Groups whose stored scale decodes to
    0 keep HQQ's codes (every code decodes alike there).
    """
    rows, cols = W.shape
    g = spec.group_size
    s_hat = torch.from_numpy(encode_meta(scale, spec)[2]).to(device).view(rows, -1, 1)  # [rows, groups, 1]
    z_hat = torch.from_numpy(encode_meta(zero, spec)[2]).to(device).view(rows, -1, 1)
    out = q.copy()
    step = max(1, _CHUNK // cols)
    for i in range(0, rows, step):  # row chunks: no second full-size float32 copy of W
        w = W[i : i + step].to(device, torch.float32).view(-1, cols // g, g)  # [r, groups, g]
        s, z = s_hat[i : i + step], z_hat[i : i + step]
        new = torch.round(w / torch.where(s == 0, 1.0, s) + z).clamp_(0, (1 << spec.bits) - 1)
        keep = (s == 0).expand_as(new).reshape(-1, cols).cpu().numpy()
        chunk = new.view(-1, cols).to("cpu", torch.uint8).numpy()
        out[i : i + step] = np.where(keep, out[i : i + step], chunk)
    return out


_CHUNK = 1 << 22  # elements per chunk: error sums never hold a second full-size float32 copy


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
    step = max(1, _CHUNK // max(1, W2.shape[1]))
    err2 = norm2 = 0.0
    for i in range(0, rows, step):
        w = _float32(W2[i : i + step]).ravel()
        d = w - A2[i : i + step].astype(np.float32, copy=False).ravel()
        err2 += float(np.dot(d.astype(np.float64), d))  # float64 accumulation across chunks and within them
        norm2 += float(np.dot(w.astype(np.float64), w))
    if norm2 == 0.0:
        return 0.0 if err2 == 0.0 else 1.0
    return float(np.sqrt(err2 / norm2))


def _encode(label: str, spec: QuantSpec, **arrays) -> bytes:
    try:
        return encode_matrix(spec, **arrays)
    except SourceError as e:
        hint = e.hint
        if spec.quantized and spec.meta_bits == 16:  # hqq's zero = -min / scale can pass 65504 on flat groups
            hint = "hqq's scale/zero for this tensor do not fit float16; use --meta-bits 8 (float32 ranges)"
        raise SourceError(f"tensor {label}: {e.message}", hint=hint) from None


def encode_tensor(W: torch.Tensor, spec: QuantSpec, device: str, label: str) -> tuple[bytes, float]:
    """The bytes of `W` stored as `spec`, and their relative error against `W`.

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
        q, scale, zero = hqq_quantize(W, spec, device)
        if spec.meta_bits == 4:  # 8-bit meta moves the weights too little to pay (0.3021 both ways)
            q = refit_codes(W, spec, q, scale, zero, device)
    except torch.OutOfMemoryError:
        raise MoepackError(f"out of GPU memory quantizing {label}", hint="close other GPU programs, or use --device cpu") from None
    payload = _encode(label, spec, q=q, scale=scale, zero=zero)
    del q, scale, zero
    shape = tuple(W.shape)
    stored = decode_matrix(component_views(payload, shape, spec), shape, spec)
    return payload, relative_error(W, stored)
