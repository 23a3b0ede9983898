"""A quantized matrix's .moepack bytes, built in torch on the device hqq ran on.

`formats.qtensor.encode_matrix` (numpy, on the host) defines the bytes, and this module
builds the same bytes (tests/quantize/test_encode.py holds them equal, byte for byte). It
exists for speed. On the H100 host hqq takes 0.1-0.2 s per Mixtral-8x7B expert matrix, but
the numpy encoding and the float32 decode behind the recorded error took another 2-3 s on
the host CPU (BENCHMARKS.md section 2), ~90% of a GPU quantize. Here the meta codes, the
re-rounded codes, the bit planes and the error check run where the codes already are, and
only the finished bytes cross to the host.

Bit-exactness with numpy rests on three things:
- elementwise float32 ops, each rounded once: a mul and an add stay two ops (no fused
  multiply-add), as in the runtime's decoder (runtime.dequant);
- divisions by tensors, never by a Python number, because CUDA's division by a host scalar
  multiplies by its reciprocal (a different rounding);
- round-half-to-even (`torch.round`, as `np.rint`).
"""

from __future__ import annotations

import math
import sys

import torch

from formats.packing import plane_widths
from formats.qtensor import QuantSpec, matrix_layout
from runtime.dequant import ITEMSIZE, component_tensors, dequantize_meta, group_meta, unpack_codes

# Elements per chunk of the row loops: the float32 temporaries of one chunk stay ~16 MB, so a
# CPU quantize never holds a second full-size float32 copy of a matrix.
CHUNK = 1 << 22


def _row_chunks(rows: int, cols: int):
    step = max(1, CHUNK // max(1, cols))
    for i in range(0, rows, step):
        yield slice(i, min(rows, i + step))


def pack_plane(q: torch.Tensor, width: int) -> torch.Tensor:
    """Codes [..., n] u8, each < 2**width -> [..., ceil(n * width / 8)] u8, LSB first (FORMAT.md "Bit planes")."""
    if width == 8:
        return q.contiguous()
    per = 8 // width
    pad = -q.shape[-1] % per
    if pad:
        q = torch.cat([q, q.new_zeros(q.shape[:-1] + (pad,))], dim=-1)
    q = q.reshape(q.shape[:-1] + (-1, per))  # [..., bytes, per]
    out = q[..., 0].clone()
    for i in range(1, per):
        out |= q[..., i] << (i * width)
    return out


def pack_codes(q: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """`bits`-wide codes [rows, cols] u8 -> their bit planes, low bits first."""
    planes, shift = [], 0
    for width in plane_widths(bits):
        planes.append(pack_plane((q >> shift) & ((1 << width) - 1), width))
        shift += width
    return planes


def encode_meta(values: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Twin of formats.qtensor.encode_meta: per-group scales or zeros [n] f32 -> (the stored
    codes u8, (step, min) f32 [M, 2], the float32 values the codes decode to [n])."""
    group, top = spec.meta_group_size, (1 << spec.meta_bits) - 1
    v = values.reshape(-1).to(torch.float32)
    n = v.numel()
    m = -(-n // group)
    padded = torch.cat([v, v[-1:].expand(m * group - n)]).view(m, group)  # the last value repeated
    lo = padded.amin(dim=1)
    step = (padded.amax(dim=1) - lo) / torch.full_like(lo, top)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.round((padded - lo[:, None]) / safe[:, None]).clamp_(0, top)
    codes = torch.nan_to_num(codes).to(torch.uint8).view(-1)[:n]  # non-finite meta is refused later
    meta = torch.stack([step, lo], dim=1)
    return pack_plane(codes.view(1, -1), spec.meta_bits).view(-1), meta, dequantize_meta(codes, meta, group)


def refit_codes(W: torch.Tensor, spec: QuantSpec, q: torch.Tensor, s_hat: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
    """HQQ's codes `q` [rows, cols] re-rounded to the scale and zero the file holds (decoded,
    per group): clip(round(W / s + z)).

    HQQ fits its codes to float16 scale/zero. Storing those as 4-bit codes moves them a little,
    and every weight's nearest code moves with them. Re-rounding makes each code the nearest to
    what the runtime decodes: 4-bit meta then costs ~1% relative weight error over fp16 meta
    instead of ~1.5% (BENCHMARKS.md section 10). Groups whose stored scale decodes to 0 keep
    HQQ's codes (every code decodes alike there).
    """
    rows, cols = W.shape
    g = spec.group_size
    s_all, z_all = s_hat.view(rows, -1, 1), z_hat.view(rows, -1, 1)  # [rows, groups, 1]
    out = q.clone()
    for r in _row_chunks(rows, cols):
        w = W[r].to(torch.float32).view(-1, cols // g, g)  # [r, groups, g]
        s, z = s_all[r], z_all[r]
        new = torch.round(w / torch.where(s == 0, torch.ones_like(s), s) + z).clamp_(0, (1 << spec.bits) - 1)
        out[r] = torch.where(s == 0, q[r].view_as(new), new.to(torch.uint8)).view(-1, cols)
    return out


def stored_meta(scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and zero [n] f32 -> the float32 values the file's bytes decode them to
    (encode_codes stores them the same way)."""
    if spec.meta_bits == 16:
        return scale.to(torch.float16).to(torch.float32), zero.to(torch.float16).to(torch.float32)
    return encode_meta(scale, spec)[2], encode_meta(zero, spec)[2]


def encode_codes(W: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 spec: QuantSpec, refit: bool = True) -> torch.Tensor | None:
    """The bytes of one quantized matrix as a 1-D u8 tensor on q's device, laid out by
    formats.qtensor.matrix_layout: HQQ's codes q [rows, cols] u8 and per-group scale and zero
    [rows * cols // g] f32, re-rounded first where the meta is 4-bit (unless refit=False: codes
    chosen already for the stored scale and zero, by quantize/gptq.py).

    None where a float component is not finite (an inf or NaN stored would decode to garbage
    silently): the caller then lets the numpy reference refuse it with its message.
    """
    if sys.byteorder != "little":  # the format is little-endian, and these bytes are native
        return None
    shape = tuple(q.shape)
    arrays = {}
    if spec.meta_bits == 16:
        arrays["scale"], arrays["zero"] = scale.to(torch.float16), zero.to(torch.float16)
    else:
        arrays["scale"], arrays["scale_meta"], s_hat = encode_meta(scale, spec)
        arrays["zero"], arrays["zero_meta"], z_hat = encode_meta(zero, spec)
        if spec.meta_bits == 4 and refit:  # 8-bit meta moves the weights too little to pay (0.3021 both ways)
            q = refit_codes(W, spec, q, s_hat, z_hat)
    if not all(bool(torch.isfinite(a).all()) for a in arrays.values() if a.is_floating_point()):
        return None
    arrays.update(zip(("q", "q_hi"), pack_codes(q, spec.bits)))
    comps, size = matrix_layout(shape, spec)
    out = torch.zeros(size, dtype=torch.uint8, device=q.device)  # padding between components: zeros
    for c in comps:
        a = arrays[c.name]
        if tuple(a.shape) != c.shape or a.element_size() != ITEMSIZE[c.dtype]:
            raise ValueError(f"component {c.name}: {tuple(a.shape)} {a.dtype}, the layout says {c.shape} {c.dtype}")
        out[c.offset : c.offset + c.nbytes] = a.contiguous().view(-1).view(torch.uint8)
    return out


def stored_error(W: torch.Tensor, buf: torch.Tensor, spec: QuantSpec) -> float:
    """||W - decode(buf)||_F / ||W||_F for the matrix bytes `buf` (1-D u8 on W's device), in row
    chunks and float64 sums: the error a runtime will see, since it is measured on the bytes.

    0 for an all-zero W stored exactly, 1 for an all-zero W stored as anything else.
    """
    rows, cols = W.shape
    g = spec.group_size
    comps = component_tensors(buf, (rows, cols), spec)
    s, z = group_meta(comps, (rows, cols), spec)  # [rows, groups, 1]
    planes = {k: v for k, v in comps.items() if k in ("q", "q_hi")}
    err_rows, norm_rows = [], []
    for r in _row_chunks(rows, cols):
        codes = unpack_codes({k: v[r] for k, v in planes.items()}, spec.bits, cols).to(torch.float32)
        approx = (codes.view(-1, cols // g, g) - z[r]) * s[r]  # [r, groups, g], as decode_matrix
        w = W[r].to(torch.float32)
        d = (w - approx.view(-1, cols)).to(torch.float64)
        w64 = w.to(torch.float64)
        # per-row sums, then an exactly rounded sum of the rows, so that the header, like the
        # data, has the same bytes at any thread count: torch's CPU reductions split a row
        # between threads only past 32768 values where a chunk has fewer rows than threads,
        # while a float64 dot over the chunk splits it always
        err_rows.append((d * d).sum(dim=1))
        norm_rows.append((w64 * w64).sum(dim=1))
    err2 = math.fsum(torch.cat(err_rows).tolist())
    norm2 = math.fsum(torch.cat(norm_rows).tolist())
    if norm2 == 0.0:
        return 0.0 if err2 == 0.0 else 1.0
    return (err2 / norm2) ** 0.5
