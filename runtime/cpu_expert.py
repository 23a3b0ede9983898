"""A fast CPU path for one packed expert at batch 1: w2(silu(w1 x) * w3 x) straight from the
record's bytes, multi-threaded over output rows (issue #7).

Each matrix goes to the first kernel that takes it:
1. the compiled C kernel (runtime.cpu_native: int16 x, vpmaddwd; 2/3/4-bit codes with 8-bit
   meta and groups of whole 32-bit words, i.e. every default layout), 1.7x (2-bit) and 2.3x
   (3-bit) faster than numba on one core of the development machine;
2. the numba kernel below (every layout, float32 x);
3. dequantize, then matmul (no numba, no compiler).

The numba kernel's results match runtime.experts.plain_expert_ffn to ~1e-7 relative (tests allow 1e-5), not bit for
bit: the kernel uses the factored form and fastmath, so the float32 sums are reordered and
contracted into fused multiply-adds. Per output row n and quantization group g (scale s,
zero z, codes q, W = (q - z) * s):

    y[n] = sum_g s[n,g] * (sum_{k in g} q[n,k] x[k] - z[n,g] * X[g]),  X[g] = sum_{k in g} x[k]

so the inner loop is one multiply-add per weight on the code converted to float, with no
per-weight subtract or scale multiply; s and z are decoded once per group, X once per token.

How the inner loop is laid out (what makes LLVM vectorize it, 8 float lanes on AVX2):
- a row's codes are read as "units", 32-bit words (16 2-bit, 8 4-bit or 4 8-bit codes; 16-bit
  words when the group size is not a multiple of 16 codes), one unit per SIMD lane: lane j
  handles unit j, so consecutive lanes read consecutive words and no lane ever needs a
  horizontal sum before the end of the row;
- x is transposed per call to xg[t, p, j] = x[t, CU*j + p] (CU codes per unit), so the p-th
  code of 8 consecutive units meets 8 contiguous x values;
- the p-th code is taken as `word & (mask << W*p)` without shifting it down: that is code *
  2^(W*p), and xg is pre-scaled by 2^-(W*p) (exact, powers of two), saving a shift per code;
  only the top code of a 32-bit word is shifted down (its mask reaches the sign bit);
- scales and zeros are decoded for a whole row first, into one float per unit, in a loop per
  meta group (constant (step, min)) that vectorizes too. Array indices come from ranges
  starting at 0 over slices: numba's negative-index wrap-around code otherwise blocked
  vectorization of that loop, and it then cost twice the dot products for 2-bit g16.
Measured on a 2-core EPYC (one 14336 x 4096 matrix, 2-bit g16, 1 thread): the previous exact
kernel 33 ms, the factored per-group loop 33 ms, a per-byte two-pass version 18 ms, this 5 ms.

numba is optional (the `cpu` extra). Both kernels are loaded only when first needed so that
`python -m runtime.generate` starts fast.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time

import numpy as np
import torch

from formats.header import ExpertLayout
from formats.qtensor import meta_codes

from .dequant import component_tensors, dequantize

_UNIT_DTYPES = {1: np.int8, 2: np.int16, 4: np.int32}


@functools.lru_cache(maxsize=1)
def _numba():
    """numba, or None when it is not installed."""
    try:
        import numba
    except ImportError:
        return None
    return numba


def _native():
    """The compiled kernel (runtime.cpu_native), or None; imported only when first needed."""
    from .cpu_native import native_kernel

    return native_kernel()


def cpu_expert_available() -> bool:
    """Whether a fast kernel (compiled C or numba) serves cpu_expert_ffn; else plain torch."""
    return _native() is not None or _numba() is not None


def cpu_kernel_name() -> str:
    """Which kernel serves cpu_expert_ffn here: 'native', 'numba' or 'torch' (for statistics)."""
    return "native" if _native() is not None else "numba" if _numba() is not None else "torch"


def _geometry(bits: int, group: int) -> tuple[int, int, int, int]:
    """(W, CU, UB, HB): bits per code in the low plane (3-bit: its 2-bit plane), codes per
    unit, bytes per unit of the low plane and of the 3-bit high plane (1 bit per code)."""
    w = {2: 2, 3: 2, 4: 4, 8: 8}[bits]
    cu = 32 // w if group % (32 // w) == 0 else 8  # a unit never straddles two groups
    return w, cu, cu * w // 8, cu // 8


@functools.lru_cache(maxsize=None)
def _kernel(BITS: int, G: int):
    """The matrix-vector kernel for BITS-wide codes in groups of G, compiled (or loaded from
    numba's cache) on first use. BITS and G are closure constants, so the branches on them
    fold away and the per-unit loops unroll at compile time (numba's cache keys on them)."""
    numba = _numba()
    f32, i32 = np.float32, np.int32
    W, CU, UB, HB = _geometry(BITS, G)
    MASK = (1 << W) - 1
    UPG = G // CU  # units per group
    ROWS = 64  # rows per parallel task: the decode buffers are allocated once per task

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def gemv(q, qhi, scale, smeta, zero, zmeta, mg, xg, xh, xs, out):
        # q: [N, U] low-plane units (int32 or int16: UB bytes); qhi: [N, U] high-plane units
        # (3-bit: int16 or int8; else unused); U = K / CU units per row
        # scale, zero: [N*K/G] u8 codes (8-bit meta) or f32 values (fp16 meta, then meta = (1, 0))
        # smeta, zmeta: [M, 2] f32 (step, min) per mg groups
        # xg: [T, CU, U] x[t, CU*j + p] * 2^-(W*p) (top code of a 32-bit unit: * 1)
        # xh: [T, CU, U] 4 * x[t, CU*j + p] * 2^-p (3-bit high plane); xs: [T, U] x summed per unit
        # out: [T, N] f32
        N, U = q.shape
        T = xg.shape[0]
        gpr = U // UPG  # groups per row
        for task in numba.prange((N + ROWS - 1) // ROWS):
            sb = np.empty(U, np.float32)  # [U] scale of each unit's group
            zb = np.empty(U, np.float32)  # [U] zero of each unit's group
            for n in range(task * ROWS, min(N, task * ROWS + ROWS)):
                i = n * gpr  # this row's first group
                g = 0
                while g < gpr:  # one pass per meta group the row overlaps
                    m = (i + g) // mg
                    e = min(gpr, (m + 1) * mg - i)
                    ss, sm, zs, zm = smeta[m, 0], smeta[m, 1], zmeta[m, 0], zmeta[m, 1]
                    sc, zc = scale[i + g:i + e], zero[i + g:i + e]
                    sbv, zbv = sb[g * UPG:e * UPG], zb[g * UPG:e * UPG]
                    for gg in range(e - g):
                        s = ss * f32(sc[gg]) + sm
                        z = zs * f32(zc[gg]) + zm
                        for u in range(UPG):
                            sbv[gg * UPG + u] = s
                            zbv[gg * UPG + u] = z
                    g = e
                for t in range(T):
                    acc = f32(0)
                    for j in range(U):  # vectorized: one unit per lane
                        word = i32(q[n, j])
                        if UB < 4:  # int16 units: drop the sign extension
                            word = word & i32((1 << (8 * UB)) - 1)
                        d = f32(0)
                        for p in range(CU):  # unrolled; code p scaled by 2^(W*p), undone in xg
                            if UB == 4 and p == CU - 1:
                                c = (word >> i32(W * p)) & i32(MASK)
                            else:
                                c = word & i32(MASK << (W * p))
                            d += f32(c) * xg[t, p, j]
                        if BITS == 3:  # code = low 2 bits + 4 * high bit; the 4 is in xh
                            h = i32(qhi[n, j]) & i32((1 << (8 * HB)) - 1)
                            for p in range(CU):
                                d += f32(h & i32(1 << p)) * xh[t, p, j]
                        acc += sb[j] * (d - zb[j] * xs[t, j])
                    out[t, n] = acc

    return gemv


@functools.lru_cache(maxsize=None)
def _x_scales(bits: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """[CU] f32 factors of xg and xh: they undo the unshifted codes (see the module doc)."""
    w, cu, ub, _ = _geometry(bits, group)
    p = np.arange(cu)
    lo = np.where((ub == 4) & (p == cu - 1), 1.0, 2.0 ** (-w * p)).astype(np.float32)
    return lo, (4.0 * 2.0 ** -p).astype(np.float32)


def _prepare_x(x: np.ndarray, bits: int, group: int):
    """x [T, K] f32 -> xg, xh [T, CU, K/CU] and xs [T, K/CU] (see gemv)."""
    t, k = x.shape
    _, cu, _, _ = _geometry(bits, group)
    lo, hi = _x_scales(bits, group)
    xu = x.reshape(t, k // cu, cu)  # [T, U, CU]
    xg = np.ascontiguousarray((xu * lo).transpose(0, 2, 1))
    xh = np.ascontiguousarray((xu * hi).transpose(0, 2, 1)) if bits == 3 else xg
    xs = xu.sum(-1, dtype=np.float64).astype(np.float32)
    return xg, xh, xs


@contextlib.contextmanager
def _numba_settings(threads: int | None):
    """SLP vectorization on while the kernel may compile (numba reads the flag per compile and
    leaves it off by default), and the thread count for this call."""
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


def _numba_matvec(c: dict, spec, x: np.ndarray, threads: int | None) -> np.ndarray:
    """W x by the numba kernel: x [T, K] f32 -> [T, N] f32."""
    _, _, ub, hb = _geometry(spec.bits, spec.group_size)
    q = c["q"].view(_UNIT_DTYPES[ub])  # [N, K/CU] units (rows are whole units: K is a multiple of G)
    qhi = c["q_hi"].view(_UNIT_DTYPES[hb]) if "q_hi" in c else q  # an unused stand-in otherwise
    if spec.coded_meta:
        scale, zero = c["scale"], c["zero"]
        if spec.meta_bits == 4:  # unpacked to a byte per group (the compiled kernel reads nibbles)
            n_groups = q.shape[0] * x.shape[1] // spec.group_size
            scale, zero = meta_codes(scale, n_groups, 4), meta_codes(zero, n_groups, 4)
        smeta, zmeta, mg = c["scale_meta"], c["zero_meta"], spec.meta_group_size
    else:  # widen fp16 meta once (rare layout; the 8-bit meta default needs no copy)
        scale, zero = c["scale"].astype(np.float32), c["zero"].astype(np.float32)
        smeta = zmeta = _IDENTITY_META
        mg = scale.size
    xg, xh, xs = _prepare_x(x, spec.bits, spec.group_size)
    out = np.empty((x.shape[0], q.shape[0]), np.float32)
    with _numba_settings(threads):
        _kernel(spec.bits, spec.group_size)(q, qhi, scale, smeta, zero, zmeta, mg, xg, xh, xs, out)
    return out


def native_matrix(buf: torch.Tensor, shape: tuple[int, int], spec, base: int = 0):
    """(the compiled kernel, the matrix's descriptor) where the kernel is built and takes the
    matrix whose components start at byte `base` of `buf` (contiguous, CPU); else None."""
    native = _native()
    if native is None or not buf.is_contiguous():
        return None
    from .cpu_native import matrix_descriptor

    desc = matrix_descriptor(tuple(shape), spec, base)
    return None if desc is None else (native, desc)


def packed_matvec(buf: torch.Tensor, shape: tuple[int, int], spec, base: int, x: torch.Tensor,
                  threads: int | None = None) -> torch.Tensor | None:
    """x @ W.T for the packed matrix whose components start at byte `base` of `buf` (uint8,
    CPU): x [T, K] float32 contiguous -> [T, N] float32, by the compiled kernel where it takes
    the layout and x (finite), else numba; None when neither is there. `threads` None: torch's
    thread count (one knob for the whole CPU path, e.g. generate's --threads)."""
    threads = threads or torch.get_num_threads()
    hit = native_matrix(buf, shape, spec, base)
    if hit is not None:
        y = hit[0].gemv(buf, hit[1], x, threads)
        if y is not None:
            return y
    if _numba() is None:
        return None
    c = {k: v.numpy() for k, v in component_tensors(buf, shape, spec, base=base).items()}
    return torch.from_numpy(_numba_matvec(c, spec, x.numpy(), threads))


def dequantize_packed(buf: torch.Tensor, shape: tuple[int, int], spec, base: int, dtype: torch.dtype,
                      threads: int | None = None, transient: bool = False) -> torch.Tensor:
    """dequant.dequantize of the matrix whose components start at byte `base` of `buf`: on the
    CPU by the compiled kernel where it takes the layout (the same float32 bits, ~4x faster than
    torch's unpacking on dev-cpu), else in torch. transient: float32 written into this thread's
    scratch buffer (a view, valid until the thread's next transient call), for a caller that
    multiplies and drops it: a fresh tensor of that size is mapped anew by the allocator and
    every page faults on first write, which cost 4-5x the dequantize itself (BENCHMARKS.md
    section 23)."""
    hit = native_matrix(buf, shape, spec, base) if buf.device.type == "cpu" and spec.quantized else None
    if hit is not None:
        out = _scratch(shape[0] * shape[1]) if transient and dtype == torch.float32 else None
        w = hit[0].dequant(buf, hit[1], threads or torch.get_num_threads(), out)
        if w is not None:
            return w.to(dtype)
    return dequantize(component_tensors(buf, tuple(shape), spec, base=base), tuple(shape), spec, dtype)


_THREAD = threading.local()  # .scratch: this thread's float32 buffer for transient weights


def _scratch(numel: int) -> torch.Tensor:
    """This thread's float32 scratch of at least `numel` elements (grown, never shrunk: one
    Mixtral-8x7B expert matrix is 235 MB, held after the first long prompt)."""
    buf = getattr(_THREAD, "scratch", None)
    if buf is None or buf.numel() < numel:
        buf = _THREAD.scratch = None  # the old one goes before the new one is allocated
        buf = _THREAD.scratch = torch.empty(numel, dtype=torch.float32)
    return buf


def _matvec(record: torch.Tensor, m, x: np.ndarray, threads: int | None) -> np.ndarray:
    """W x for matrix layout `m` of `record`: x [T, K] f32 -> [T, N] f32 (dequantize-then-matmul
    when no kernel applies)."""
    xt = torch.from_numpy(x)
    out = packed_matvec(record, m.shape, m.spec, m.offset, xt, threads)
    if out is not None:
        return out.numpy()
    w = dequantize_packed(record, m.shape, m.spec, m.offset, torch.float32, threads, transient=True)
    return (xt @ w.T).numpy()


def cpu_expert_ffn(record: torch.Tensor, layout: ExpertLayout, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x) for x: [T, H] (float32/16, bfloat16, CPU) with the expert in
    `record` (uint8, CPU); `threads` kernel threads (None: torch.get_num_threads())."""
    if not cpu_expert_available() or any(not m.spec.quantized for m in layout.matrices) or record.device.type != "cpu":
        from .experts import plain_expert_ffn  # dequantize, then matmul (not expert_ffn: it dispatches here)

        return plain_expert_ffn(record, layout, x, torch.float32).to(x.dtype)
    whole = _native_expert(record, layout, x, threads, whole=True)
    if whole is not None:
        return whole[1].to(x.dtype)
    h = cpu_expert_hidden(record, layout, x, threads).numpy()  # [T, I]
    y = _matvec(record, layout.matrix("w2"), np.ascontiguousarray(h), threads)  # [T, H]
    return torch.from_numpy(y).to(x.dtype)


def cpu_expert_hidden(record: torch.Tensor, layout: ExpertLayout, x: torch.Tensor, threads: int | None = None,
                      first_row: int = 0) -> torch.Tensor:
    """h = silu(w1 x) * w3 x, float32 [T, I], for x: [T, H] on the CPU: the first two thirds of
    cpu_expert_ffn (the hybrid engine's split leaves w2 h to the GPU). first_row > 0: only
    h's rows first_row.. ([T, I - first_row]; the GPU computes the others, see
    runtime.offload.split), where dequant.row_prefix_ok(first_row) holds."""
    part = _native_expert(record, layout, x, threads, whole=False, first_row=first_row)
    if part is not None:
        return part[0]
    xs = np.ascontiguousarray(x.detach().to(torch.float32).numpy())  # [T, H]
    a = torch.from_numpy(_matvec_rows(record, layout.matrix("w1"), first_row, xs, threads))  # [T, I - first_row]
    b = torch.from_numpy(_matvec_rows(record, layout.matrix("w3"), first_row, xs, threads))
    return torch.nn.functional.silu(a) * b


def _matvec_rows(record: torch.Tensor, m, first: int, x: np.ndarray, threads: int | None) -> np.ndarray:
    """_matvec for rows first.. of matrix `m`: the compiled kernel on those rows alone, else
    the whole matrix's product, sliced."""
    if first == 0:
        return _matvec(record, m, x, threads)
    native = _native()
    if native is not None and record.is_contiguous():
        from .cpu_native import rows_descriptor

        desc = rows_descriptor(tuple(m.shape), m.spec, m.offset, first)
        if desc is not None:
            y = native.gemv(record, desc, torch.from_numpy(x), threads or torch.get_num_threads())
            if y is not None:
                return y.numpy()
    return np.ascontiguousarray(_matvec(record, m, x, threads)[:, first:])


def _native_expert(record: torch.Tensor, layout: ExpertLayout, x: torch.Tensor, threads: int | None,
                   whole: bool, first_row: int = 0, start: bool = False):
    """The compiled kernel's one-call expert (h of rows first_row.., and y if `whole`), or None
    where it does not apply. One call instead of three matrices' worth of views, conversions
    and launches: ~285 us of Python per expert on dev-cpu, which the slow host of the GPU
    machine multiplies. `start`: queued on the kernel's own thread instead (a NativeJob, or
    None if its queue is full)."""
    native = _native()
    if native is None or not record.is_contiguous() or record.dtype != torch.uint8 or (whole and first_row):
        return None
    from .cpu_native import expert_descriptor

    desc = expert_descriptor(layout, first_row)
    if desc is None or record.numel() < layout.record_size:
        return None
    xs = x.detach().to(torch.float32).contiguous()  # [T, H]; a non-finite x is declined in C
    m1, m2 = layout.matrix("w1"), layout.matrix("w2")
    call = native.expert_job if start else native.expert
    return call(record, desc, xs, m1.shape[0] - first_row, m2.shape[0] if whole else None,
                threads or torch.get_num_threads())


# "0": start_expert runs its job inline, where its result is asked for (A/B timing)
JOBS_ENV = "MOEPACK_CPU_WORKER"


class ExpertJob:
    """The CPU's work on one expert, started by start_expert. result() -> (its output, the
    seconds the computation took, not the wait)."""

    def __init__(self, native_job, fallback, whole: bool):
        self._native, self._fallback, self._whole = native_job, fallback, whole
        self._value: tuple[torch.Tensor, float] | None = None

    @property
    def on_thread(self) -> bool:
        """Whether the kernel's own thread runs it (else: the caller, at result())."""
        return self._native is not None

    def result(self) -> tuple[torch.Tensor, float]:
        if self._value is None:
            done = self._native.result() if self._native is not None else None
            if done is None:  # inline, or the kernel declined (a non-finite x): the fallback chain
                t = time.perf_counter()
                out = self._fallback()
                done = ((out, out), time.perf_counter() - t)
            (h, y), seconds = done
            self._value = (y if self._whole else h), seconds
        return self._value


def start_expert(record: torch.Tensor, layout: ExpertLayout, x: torch.Tensor, threads: int | None = None,
                 first_row: int = 0, whole: bool = False) -> ExpertJob:
    """Start the CPU's work on one expert for x [T, H]: cpu_expert_hidden (rows first_row..)
    or, `whole`, cpu_expert_ffn. Where the compiled kernel takes it, it runs on the kernel's own
    thread (runtime/csrc/cpu_jobs.c) and this returns at once: the caller issues other work
    meanwhile, and the wait in result() releases the GIL. Elsewhere (no compiled kernel,
    MOEPACK_CPU_WORKER=0, a layout it does not take) the job runs in result()."""
    def fallback():
        if whole:
            return cpu_expert_ffn(record, layout, x, threads)
        return cpu_expert_hidden(record, layout, x, threads, first_row)

    job = None
    if os.environ.get(JOBS_ENV, "1") != "0":
        job = _native_expert(record, layout, x, threads, whole, first_row, start=True)
    return ExpertJob(job, fallback, whole)
