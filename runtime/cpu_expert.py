"""A fast CPU path for one packed expert at batch 1: w2(silu(w1 x) * w3 x) straight from the
record's bytes, multi-threaded over output rows with numba (issue #7).

Each weight is rebuilt exactly as the reference does it, W = (q - z) * s in float32 with s, z
decoded from the meta codes first, and multiplied by x with float32 accumulation; only the
summation order differs from runtime.experts.expert_ffn (relative difference ~1e-7).

How it is fast without fastmath (which would let LLVM reorder the sums):
- codes are decoded through small float tables (byte -> its 4 2-bit codes, 2 4-bit codes or
  8 high bits of a 3-bit code): one byte load gives several codes as floats, with no integer
  shift/convert chains, which LLVM does not vectorize without reassociation;
- each row keeps 8 independent accumulators (one per column mod 8) instead of one running
  sum: independent chains are what the SLP vectorizer packs into one SIMD register, and a
  strict left-to-right sum would serialise on the add latency;
- the meta group of the current group is tracked with a counter, not `i // meta_group_size`
  (a 64-bit division per group cost a third of the run time for 2-bit g16).
A per-token lookup table (byte -> sum of its codes times x) was tried as well: one lookup per
4 weights, but the lookups form one dependent scalar chain per row and the table (K/4 x 256
floats) falls out of L1, and it ran 2-3x slower than this on a 2-core EPYC.

numba is optional (the `cpu` extra): without it cpu_expert_ffn falls back to
runtime.experts.expert_ffn, and it is imported only when first needed so that
`python -m runtime.generate` starts fast.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch

from formats.header import ExpertLayout

from .dequant import component_tensors

# byte -> its codes as float32, low bits first (docs/FORMAT.md, "Bit planes")
_BYTES = np.arange(256)
TAB2 = ((_BYTES[:, None] >> np.arange(0, 8, 2)) & 3).astype(np.float32)  # [256, 4]
TAB4 = ((_BYTES[:, None] >> np.arange(0, 8, 4)) & 15).astype(np.float32)  # [256, 2]
TAB_HI = (((_BYTES[:, None] >> np.arange(8)) & 1) * 4).astype(np.float32)  # [256, 8]: bit 2 of a 3-bit code


@functools.lru_cache(maxsize=1)
def _numba():
    """numba, or None when it is not installed."""
    try:
        import numba
    except ImportError:
        return None
    return numba


def cpu_expert_available() -> bool:
    return _numba() is not None


@functools.lru_cache(maxsize=None)
def _kernel(BITS: int):
    """The row kernel for BITS-wide codes, compiled (or loaded from numba's cache) on first use.
    BITS is a closure constant, so the branches on it fold away at compile time (a runtime
    `bits` argument left them in the inner loop and blocked vectorization: 3.5x slower)."""
    numba = _numba()
    f32 = np.float32

    @numba.njit(parallel=True, fastmath=False, cache=True)
    def gemv(q, qhi, scale, smeta, zero, zmeta, mg, g, x, out):
        # q: [N, K*p/8] u8 (p = 2 for 3-bit); qhi: [N, K/8] u8 (3-bit) or unused
        # scale, zero: [N*K/g] u8 codes (8-bit meta) or f32 values (fp16 meta, then meta = (1, 0))
        # smeta, zmeta: [M, 2] f32 (step, min) per mg groups; x: [T, K] f32; out: [T, N] f32
        N = q.shape[0]
        T, K = x.shape
        gpr = K // g  # groups per row
        upg = g // 8  # 8-column units per group (g is a multiple of 8, so units never straddle)
        for n in numba.prange(N):
            for t in range(T):
                # one accumulator per column mod 8: independent chains the SLP vectorizer packs
                a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = f32(0)
                i = n * gpr
                m = i // mg
                left = mg - (i - m * mg)  # groups left in meta group m
                ss, sm, zs, zm = smeta[m, 0], smeta[m, 1], zmeta[m, 0], zmeta[m, 1]
                for gi in range(gpr):
                    if left == 0:
                        m += 1
                        left = mg
                        ss, sm, zs, zm = smeta[m, 0], smeta[m, 1], zmeta[m, 0], zmeta[m, 1]
                    left -= 1
                    # product rounded before the sum, as the reference (no fused multiply-add)
                    s = ss * f32(scale[i + gi]) + sm
                    z = zs * f32(zero[i + gi]) + zm
                    for u in range(gi * upg, (gi + 1) * upg):
                        k = 8 * u
                        if BITS == 2 or BITS == 3:
                            b0, b1 = q[n, 2 * u], q[n, 2 * u + 1]
                            c0, c1, c2, c3 = TAB2[b0, 0], TAB2[b0, 1], TAB2[b0, 2], TAB2[b0, 3]
                            c4, c5, c6, c7 = TAB2[b1, 0], TAB2[b1, 1], TAB2[b1, 2], TAB2[b1, 3]
                            if BITS == 3:  # code = low 2 bits + 4 * high bit, exact in float32
                                h = qhi[n, u]
                                c0 += TAB_HI[h, 0]
                                c1 += TAB_HI[h, 1]
                                c2 += TAB_HI[h, 2]
                                c3 += TAB_HI[h, 3]
                                c4 += TAB_HI[h, 4]
                                c5 += TAB_HI[h, 5]
                                c6 += TAB_HI[h, 6]
                                c7 += TAB_HI[h, 7]
                        elif BITS == 4:
                            b0, b1, b2, b3 = q[n, 4 * u], q[n, 4 * u + 1], q[n, 4 * u + 2], q[n, 4 * u + 3]
                            c0, c1, c2, c3 = TAB4[b0, 0], TAB4[b0, 1], TAB4[b1, 0], TAB4[b1, 1]
                            c4, c5, c6, c7 = TAB4[b2, 0], TAB4[b2, 1], TAB4[b3, 0], TAB4[b3, 1]
                        else:
                            c0, c1, c2, c3 = f32(q[n, k]), f32(q[n, k + 1]), f32(q[n, k + 2]), f32(q[n, k + 3])
                            c4, c5, c6, c7 = f32(q[n, k + 4]), f32(q[n, k + 5]), f32(q[n, k + 6]), f32(q[n, k + 7])
                        a0 += ((c0 - z) * s) * x[t, k]
                        a1 += ((c1 - z) * s) * x[t, k + 1]
                        a2 += ((c2 - z) * s) * x[t, k + 2]
                        a3 += ((c3 - z) * s) * x[t, k + 3]
                        a4 += ((c4 - z) * s) * x[t, k + 4]
                        a5 += ((c5 - z) * s) * x[t, k + 5]
                        a6 += ((c6 - z) * s) * x[t, k + 6]
                        a7 += ((c7 - z) * s) * x[t, k + 7]
                out[t, n] = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))

    return gemv


@contextlib.contextmanager
def _numba_settings(threads: int | None):
    """SLP vectorization on while the kernel may compile (numba reads the flag per compile and
    leaves it off by default; the kernel relies on it), and the thread count for this call."""
    numba = _numba()
    slp, saved_threads = numba.config.SLP_VECTORIZE, numba.get_num_threads()
    numba.config.SLP_VECTORIZE = 1
    if threads is not None:
        numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.config.SLP_VECTORIZE = slp
        numba.set_num_threads(saved_threads)


_IDENTITY_META = np.array([[1.0, 0.0]], np.float32)  # s = 1 * s + 0 is exact: fp16 meta through the 8-bit path


def _matvec(record: torch.Tensor, m, x: np.ndarray) -> np.ndarray:
    """W x for matrix layout `m` of `record`: x [T, K] f32 -> [T, N] f32."""
    spec = m.spec
    c = {k: v.numpy() for k, v in component_tensors(record, m.shape, spec, base=m.offset).items()}
    qhi = c.get("q_hi", c["q"])  # an unused stand-in keeps one compiled signature per layout kind
    if spec.meta_bits == 8:
        scale, smeta, zero, zmeta, mg = c["scale"], c["scale_meta"], c["zero"], c["zero_meta"], spec.meta_group_size
    else:  # widen fp16 meta once (rare layout; the 8-bit meta default needs no copy)
        scale, zero = c["scale"].astype(np.float32), c["zero"].astype(np.float32)
        smeta = zmeta = _IDENTITY_META
        mg = scale.size
    out = np.empty((x.shape[0], m.shape[0]), np.float32)
    _kernel(spec.bits)(c["q"], qhi, scale, smeta, zero, zmeta, mg, spec.group_size, x, out)
    return out


def cpu_expert_ffn(record: torch.Tensor, layout: ExpertLayout, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x) for x: [T, H] (float32/16, bfloat16, CPU) with the expert in
    `record` (uint8, CPU); `threads` numba threads (None: numba's current setting)."""
    if not cpu_expert_available() or any(not m.spec.quantized for m in layout.matrices) or record.device.type != "cpu":
        from .experts import expert_ffn  # the plain torch path: dequantize, then matmul

        return expert_ffn(record, layout, x, torch.float32).to(x.dtype)
    xs = np.ascontiguousarray(x.detach().to(torch.float32).numpy())  # [T, H]
    with _numba_settings(threads):
        a = torch.from_numpy(_matvec(record, layout.matrix("w1"), xs))  # [T, I]
        b = torch.from_numpy(_matvec(record, layout.matrix("w3"), xs))  # [T, I]
        h = (torch.nn.functional.silu(a) * b).numpy()  # [T, I]
        y = _matvec(record, layout.matrix("w2"), np.ascontiguousarray(h))  # [T, H]
    return torch.from_numpy(y).to(x.dtype)
