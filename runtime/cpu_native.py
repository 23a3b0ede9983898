"""The compiled CPU kernel (runtime/csrc/qgemv_cpu.c, built by runtime.cpu_build), called
through ctypes. Without a compiler, or on a layout it does not cover, runtime.cpu_expert falls
back to the numba kernel, then to plain torch.

Forked processes: the library's job thread starts afresh in a child, but OpenMP (libgomp) does
not survive fork(), so a child forked after the kernel ran on more than one thread can hang in
it; start worker processes with multiprocessing's "spawn" (or "forkserver") instead.

    MOEPACK_CPU_KERNEL=numba|torch   skip this kernel (compare paths, or rule it out)
    MOEPACK_CPU_WIDE=0               keep to 8-lane (256-bit) vectors on an AVX-512 CPU
    MOEPACK_CPU_ACT=int8|int16|auto  what activations are rounded to (set_cpu_activations; default auto)
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .cpu_build import NativeBuildError, build

ABI_VERSION = 12
_UNCHECKED = object()  # NativeKernel.act8_problem before int8's first self-check
UNSUPPORTED = 1  # the kernel's return code for a layout it does not handle
BUSY = 3  # moepack_job_submit's: the queue is full (cpu_jobs.c MP_BUSY)


class _Job(ctypes.Structure):
    """cpu_jobs.c's mp_job."""

    _fields_ = [("record", ctypes.c_void_p), ("desc", ctypes.c_void_p), ("x", ctypes.c_void_p),
                ("T", ctypes.c_int64), ("h", ctypes.c_void_p), ("y", ctypes.c_void_p), ("threads", ctypes.c_int32),
                ("rc", ctypes.c_int32), ("state", ctypes.c_int32), ("pad", ctypes.c_int32), ("seconds", ctypes.c_double)]


class NativeJob:
    """moepack_expert running on the library's thread (NativeKernel.expert_job). result() waits
    (without the GIL) and gives ((h, y or None), seconds the call took there), or None where
    the kernel declined the layout or x (the caller computes it another way)."""

    def __init__(self, kernel: "NativeKernel", job: _Job, h: torch.Tensor, y: torch.Tensor | None, inputs: tuple):
        self._kernel, self._job, self.h, self.y = kernel, job, h, y
        self._inputs = inputs  # the input tensors the job's pointers name, alive until it is done
        self._rc: int | None = None

    def _wait(self) -> None:
        if self._rc is None:
            self._rc = self._kernel._job_wait(ctypes.byref(self._job))

    def __del__(self):
        # the library's thread writes into the job and reads its tensors until it is done: a
        # job dropped unwaited (an exception between start and result) must not free them first
        try:
            self._wait()
        except Exception:  # interpreter shutdown: ctypes may be gone; nothing left to protect
            pass

    def result(self) -> tuple[tuple[torch.Tensor, torch.Tensor | None], float] | None:
        self._wait()
        if self._rc == UNSUPPORTED:
            return None
        if self._rc != 0:
            raise MemoryError("native expert kernel could not allocate its buffers")
        return (self.h, self.y), self._job.seconds


class NativeKernel:
    """The loaded library with typed entry points."""

    def __init__(self, path: Path):
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        if self.lib.moepack_abi_version() != ABI_VERSION:
            raise NativeBuildError(f"{path} has ABI {self.lib.moepack_abi_version()}, expected {ABI_VERSION}")
        self.avx2 = bool(self.lib.moepack_has_avx2())
        self.vnni = bool(self.lib.moepack_has_vnni())  # the word loop's dot products as vpdpwssd
        self.lib.moepack_set_wide.argtypes, self.lib.moepack_set_wide.restype = [ctypes.c_int], ctypes.c_int
        # 16-lane (AVX-512) rows where built and the shape allows. The switch lives in the loaded
        # library, which a second NativeKernel of the same file shares: set it, do not assume it
        self.set_wide(True)
        self.lib.moepack_set_act8.argtypes, self.lib.moepack_set_act8.restype = [ctypes.c_int], ctypes.c_int
        self.lib.moepack_uses_act8.argtypes, self.lib.moepack_uses_act8.restype = [ctypes.c_void_p], ctypes.c_int
        self.set_act8(False)
        self.act8_problem: str | None | object = _UNCHECKED  # int8's self-check: None (passed), what failed, or not run yet
        self.act8_wide = True  # int8 may take the 16-lane rows; False once only its 8-lane rows passed the check
        f = self.lib.moepack_qgemv
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        f.argtypes = [p, p, p, p, p, p, i64, ctypes.c_int, ctypes.c_int, i64, i64, i64, p, i64, p, ctypes.c_int]
        f.restype = ctypes.c_int
        self._qgemv = f
        e = self.lib.moepack_expert
        e.argtypes = [p, p, p, i64, p, p, ctypes.c_int]
        e.restype = ctypes.c_int
        self._expert = e
        h = self.lib.moepack_gemv_f16
        h.argtypes = [p, p, i64, i64, i64, p, ctypes.c_int]
        h.restype = ctypes.c_int
        self._gemv_f16 = h
        d = self.lib.moepack_dequant
        d.argtypes, d.restype = [p, p, p, ctypes.c_int], ctypes.c_int
        self._dequant = d
        self.decode_step = self.lib.moepack_decode_step  # runtime.cpu_step passes its structs by address
        self.decode_step.argtypes = [p, p, i64, p, p, ctypes.c_int]
        self.decode_step.restype = ctypes.c_int
        self.decode_work = self.lib.moepack_decode_work
        self.decode_work.argtypes, self.decode_work.restype = [p], i64
        self._job_submit, self._job_wait = self.lib.moepack_job_submit, self.lib.moepack_job_wait
        for f in (self._job_submit, self._job_wait):
            f.argtypes, f.restype = [ctypes.POINTER(_Job)], ctypes.c_int

    def set_wide(self, on: bool) -> bool:
        """Use the 16-lane rows (where built) or not; returns whether they are on. Library-wide:
        call before any other call, never while one runs."""
        self.wide = bool(self.lib.moepack_set_wide(int(on)))
        return self.wide

    def set_act8(self, on: bool) -> bool:
        """Round activations to int8 (where an AVX2 build's fast path takes the geometry; at 8
        lanes only once act8_wide is False) or to int16; returns whether int8 is on.
        Library-wide, like set_wide."""
        self.act8 = bool(self.lib.moepack_set_act8(0 if not on else 1 if self.act8_wide else 2))
        return self.act8

    def uses_act8(self, desc: tuple[int, ...]) -> bool:
        """Whether the matrix `desc` (matrix_descriptor) is computed on int8 activations now."""
        numbers = (ctypes.c_int64 * 12)(*desc)
        return bool(self.lib.moepack_uses_act8(numbers))

    def gemv_f16(self, w: torch.Tensor, x: torch.Tensor, threads: int | None) -> torch.Tensor:
        """x @ W.T for W [N, K] float16 (contiguous, CPU) and x [T, K] float32 contiguous:
        [T, N] float32, the weights widened in registers."""
        n, k = w.shape
        out = torch.empty((x.shape[0], n), dtype=torch.float32)
        rc = self._gemv_f16(w.data_ptr(), x.data_ptr(), n, k, x.shape[0], out.data_ptr(), int(threads or 0))
        if rc != 0:
            raise ValueError(f"moepack_gemv_f16 refused a [{n}, {k}] matrix")
        return out

    def dequant(self, buf: torch.Tensor, desc: tuple[int, ...], threads: int | None,
                out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The matrix `desc` (matrix_descriptor) inside `buf` (uint8, CPU, contiguous) as float32
        [N, K], bit for bit dequant.dequantize's; None if declined. out: a float32 contiguous
        buffer of at least N * K elements to write it into (the result is a view of it)."""
        n, k = desc[8], desc[9]
        if out is None:
            out = torch.empty((n, k), dtype=torch.float32)
        else:
            out = out.view(-1)[: n * k].view(n, k)
        numbers = torch.tensor(desc, dtype=torch.int64)  # held until the call returns
        rc = self._dequant(buf.data_ptr(), numbers.data_ptr(), out.data_ptr(), int(threads or 0))
        if rc == UNSUPPORTED:
            return None
        if rc != 0:
            raise MemoryError("native dequantize could not allocate its buffers")
        return out

    def gemv(self, buf: torch.Tensor, desc: tuple[int, ...], x: torch.Tensor, threads: int | None) -> torch.Tensor | None:
        """x @ W.T for the matrix `desc` (matrix_descriptor) inside `buf` (uint8, CPU,
        contiguous), x [T, K] float32 contiguous -> [T, N] float32; None if declined (a layout
        the kernel does not take, or a non-finite x)."""
        q, qh, sc, sm, z, zm, mg, group, n, k, bits, mb = desc
        p = buf.data_ptr()
        out = torch.empty((x.shape[0], n), dtype=torch.float32)
        rc = self._qgemv(p + q, None if qh < 0 else p + qh, p + sc, p + sm, p + z, p + zm, mg, mb, bits, group, n, k,
                         x.data_ptr(), x.shape[0], out.data_ptr(), int(threads or 0))
        if rc == UNSUPPORTED:
            return None
        if rc != 0:
            raise MemoryError("native qgemv could not allocate its buffers")
        return out

    def expert(self, record: torch.Tensor, desc: torch.Tensor, x: torch.Tensor, inter: int, hidden: int | None,
               threads: int | None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """One expert straight from `record` (uint8, CPU, contiguous) in one call: (h, y) with
        h = silu(w1 x) * w3 x [T, I] and y = w2 h [T, H] (hidden None: h only, y None), for x
        [T, H] float32 contiguous. desc: expert_descriptor(layout). None if the kernel declines
        the layout. Torch tensors and data_ptr() throughout: numpy's .ctypes costs microseconds
        per array, and this call is on the decode path."""
        t = x.shape[0]
        h = torch.empty((t, inter), dtype=torch.float32)
        y = torch.empty((t, hidden), dtype=torch.float32) if hidden is not None else None
        rc = self._expert(record.data_ptr(), desc.data_ptr(), x.data_ptr(), t, h.data_ptr(),
                          None if y is None else y.data_ptr(), int(threads or 0))
        if rc == UNSUPPORTED:
            return None
        if rc != 0:
            raise MemoryError("native expert kernel could not allocate its buffers")
        return h, y

    def expert_job(self, record: torch.Tensor, desc: torch.Tensor, x: torch.Tensor, inter: int, hidden: int | None,
                   threads: int | None) -> NativeJob | None:
        """expert(...) started on the library's own thread; returns at once (None: the queue
        is full, call expert instead). The tensors stay referenced by the job until its result."""
        t = x.shape[0]
        h = torch.empty((t, inter), dtype=torch.float32)
        y = torch.empty((t, hidden), dtype=torch.float32) if hidden is not None else None
        # state 2 (done) until submitted: a NativeJob dropped before its submit (an exception
        # in between) then waits for nothing; once submitted, it holds the tensors until done
        job = _Job(record.data_ptr(), desc.data_ptr(), x.data_ptr(), t, h.data_ptr(),
                   None if y is None else y.data_ptr(), int(threads or 0), 0, 2)
        handle = NativeJob(self, job, h, y, (record, desc, x))
        if self._job_submit(ctypes.byref(job)) != 0:
            handle._rc = BUSY  # never queued: nothing to wait for
            return None
        return handle


# (spec, rows, cols) of the load-time check: each code width and meta width on the in-register
# meta path (16 groups per row: the 16-lane rows where built; 8: the 8-lane ones), a group of
# two words (lanes permuted), and the per-row path with a scalar tail
_CHECKS = (((2, 16, 8, 128), 16, 256), ((3, 64, 8, 128), 16, 1024), ((4, 64, 8, 256), 8, 1024), ((2, 16, 8, 5), 8, 208),
           ((2, 16, 4, 128), 16, 256), ((3, 64, 4, 128), 16, 1024), ((2, 16, 4, 5), 8, 208), ((2, 32, 8, 64), 8, 512),
           ((2, 16, 8, 128), 8, 128), ((3, 64, 4, 128), 8, 512))


def self_check(kernel: NativeKernel) -> str | None:
    """None if the kernel matches the format's reference decode on small random matrices, else
    what went wrong. The build is -march=native from source, so a compiler or CPU this project
    never ran on gets checked before its results are used (a few milliseconds)."""
    from formats.qtensor import QuantSpec, component_views, decode_matrix, encode_matrix

    rng = np.random.default_rng(0)
    for args, n, k in _CHECKS:
        spec = QuantSpec(*args)
        groups = n * k // spec.group_size
        data = encode_matrix(spec, q=rng.integers(0, 1 << spec.bits, (n, k)), scale=rng.uniform(0.01, 0.1, groups),
                             zero=rng.uniform(0, (1 << spec.bits) - 1, groups))
        w = decode_matrix(component_views(data, (n, k), spec), (n, k), spec).astype(np.float64)
        x = rng.standard_normal((2, k)).astype(np.float32)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        desc = matrix_descriptor((n, k), spec)
        y = kernel.gemv(buf, desc, torch.from_numpy(x), 2)
        y = None if y is None else y.numpy()
        # x's int16 rounding gives ~2e-5 (3-, 4-bit) to ~1e-4 (2-bit: telescoped pairs, 2^-13.7
        # steps); a wrong lane, group or scale gives 1e-2 and more. int8 rounding (~5e-3) is
        # done here as the kernel does it, leaving float32 sums (~1e-6)
        act8 = kernel.uses_act8(desc)
        ref = (_int8_rounded(x, 8 if spec.bits == 4 else 16) if act8 else x.astype(np.float64)) @ w.T
        err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref)) if y is not None else float("inf")
        if not err < (1e-5 if act8 else 5e-4):
            return f"{spec.describe()} {n}x{k}: relative error {err:.2g}"
    return None


def _int8_rounded(x: np.ndarray, cu: int) -> np.ndarray:
    """x [T, K] rounded as quantize_x_word8 rounds it: per word of cu values, to integer steps
    of the word's largest |x| / 127 (float32 arithmetic, ties to even), as float64."""
    t, k = x.shape
    xw = x.reshape(t, k // cu, cu)
    m = np.abs(xw).max(-1, keepdims=True)
    inv = np.where(m > 0, np.float32(127) / np.where(m > 0, m, 1), 0).astype(np.float32)
    return (np.rint(xw * inv).astype(np.float64) * (m / np.float32(127)).astype(np.float64)).reshape(t, k)


_DESCRIPTORS: dict = {}


def expert_descriptor(layout, first: int = 0) -> torch.Tensor | None:
    """Cached _descriptor(layout, first), keyed by identity (hashing the layout costs more than
    the lookup is worth on the decode path; layouts live as long as their file)."""
    key = (id(layout), first)
    hit = _DESCRIPTORS.get(key)
    if hit is None or hit[0] is not layout:
        hit = _DESCRIPTORS[key] = (layout, _descriptor(layout, first))
    return hit[1]


def _descriptor(layout, first: int) -> torch.Tensor | None:
    """int64 [36]: matrix_descriptor of w1, w3 and w2 (moepack_expert's `desc`), w1 and w3 cut
    to their rows first.. (rows_descriptor; for moepack_expert without y: a split's CPU rows of
    h); None where a matrix is outside the compiled kernel."""
    m1, m3, m2 = (layout.matrix(n) for n in ("w1", "w3", "w2"))
    rows = [rows_descriptor(tuple(m.shape), m.spec, m.offset, first) if first else
            matrix_descriptor(tuple(m.shape), m.spec, m.offset) for m in (m1, m3)]
    rows.append(matrix_descriptor(tuple(m2.shape), m2.spec, m2.offset))
    if any(r is None for r in rows):
        return None
    return torch.tensor(rows, dtype=torch.int64).reshape(-1)


@functools.lru_cache(maxsize=1024)
def matrix_descriptor(shape: tuple[int, int], spec, base: int = 0) -> tuple[int, ...] | None:
    """The 12 numbers moepack_* need for one matrix whose components start at byte `base`: the
    byte offsets of q, q_hi (-1: none), scale, scale_meta, zero, zero_meta, then mg, group, N, K,
    bits, meta bits. None outside the compiled kernel (fp16 meta, 8-bit codes, a group that is
    not whole words, misaligned planes)."""
    from .dequant import _component_plan

    cu = 32 // (4 if spec.bits == 4 else 2)
    if not spec.coded_meta or spec.bits not in (2, 3, 4) or spec.group_size % cu:
        return None
    plan, _ = _component_plan(tuple(shape), spec)
    off = {c[0]: base + c[3] for c in plan}
    if off["q"] % 4 or off.get("q_hi", 0) % 2 or off["scale_meta"] % 4 or off["zero_meta"] % 4:
        return None
    return (off["q"], off.get("q_hi", -1), off["scale"], off["scale_meta"], off["zero"], off["zero_meta"],
            spec.meta_group_size, spec.group_size, shape[0], shape[1], spec.bits, spec.meta_bits)


@functools.lru_cache(maxsize=1024)
def rows_descriptor(shape: tuple[int, int], spec, base: int, first: int) -> tuple[int, ...] | None:
    """matrix_descriptor of rows first.. of the matrix at byte `base`: a matrix of its own
    whose components start past the first rows' bytes in each (dequant.row_prefix_ok must
    hold). None where the compiled kernel does not take it."""
    from .dequant import component_bytes

    full = matrix_descriptor(tuple(shape), spec, base)
    if full is None:
        return None
    skip = component_bytes((first, shape[1]), spec)
    names = ("q", "q_hi", "scale", "scale_meta", "zero", "zero_meta")
    off = [o if o < 0 else o + skip.get(n, 0) for n, o in zip(names, full[:6])]
    if off[0] % 4 or max(off[1], 0) % 2 or off[3] % 4 or off[5] % 4:
        return None
    return (*off, *full[6:8], shape[0] - first, *full[9:])


ACTIVATIONS = ("int16", "int8")
REQUESTS = (*ACTIVATIONS, "auto")
_activations: str | None = None  # set_cpu_activations's choice; None: MOEPACK_CPU_ACT's, else auto
_auto = "int16"  # what auto means for the model that ran or loaded last (set_auto_activations)


def cpu_activations() -> str:
    """What the kernel rounds activations to: set_cpu_activations's choice, else MOEPACK_CPU_ACT,
    else auto (set_auto_activations: int8 for a model wholly on the CPU, else int16)."""
    kind = _activations or os.environ.get("MOEPACK_CPU_ACT", "auto")
    if kind not in REQUESTS:
        raise ValueError(f"MOEPACK_CPU_ACT={kind!r}: expected one of {', '.join(REQUESTS)}")
    return _auto if kind == "auto" else kind


def cpu_activations_in_use(load: bool = True) -> str | None:
    """What the CPU kernel actually rounds to, for benchmark records: int8 only where it is
    loaded with int8 on (cpu_activations() is the request, which a failed check, a build without
    AVX2 or another kernel does not honour). load=False: None where no kernel was loaded (a run
    that never used it). Never raises."""
    if not load and not native_kernel.cache_info().currsize:
        return None
    kernel = native_kernel()
    return "int8" if kernel is not None and kernel.act8 else "int16"


def set_cpu_activations(kind: str) -> None:
    """What the compiled kernel rounds activations to, for every packed matrix it runs (experts,
    and attention or a head kept packed on the CPU). int16: 2^-16 of each word's (16 values, 8
    for 4-bit codes) largest |x| (2^-13.7 for 2-bit codes), within floating-point tolerance of
    the GPU path. int8: 2^-8, like llama.cpp's Q8 activations but per word, not per 256 values,
    for ~20-40% less time per weight on AVX2 and +0.07% perplexity (docs/BENCHMARKS.md sections
    28 and 30). auto (the default): set_auto_activations's choice. Applies to the kernel now and
    to one loaded later; call it before any kernel call runs, never during one."""
    global _activations
    if kind not in REQUESTS:
        raise ValueError(f"CPU activations {kind!r}: expected one of {', '.join(REQUESTS)}")
    _activations = kind
    _reapply()


@contextmanager
def activations(kind: str):
    """set_cpu_activations(kind) inside a with block; the request before it comes back after
    (quantize/imatrix.py measures with int16: exact inputs, not int8's rounding noise)."""
    global _activations
    before = _activations
    set_cpu_activations(kind)
    try:
        yield
    finally:
        _activations = before
        _reapply()


def set_auto_activations(cpu_only: bool) -> None:
    """What auto means from now on: int8 for a model that runs wholly on the CPU, as llama.cpp
    rounds its CPU activations; int16 where the kernel computes experts beside a GPU (--hybrid),
    whose results issue #7 holds to the GPU path's within floating-point tolerance. The loader
    calls it for each model, the hybrid engine before it times the kernel, and every model step
    for its own model, so models loaded one after another each run with their own rounding
    (never two models in concurrent threads: the choice is the kernel's, one per process)."""
    global _auto
    _auto = "int8" if cpu_only else "int16"
    _reapply()  # every time, not only on a change: a request or MOEPACK_CPU_ACT may have changed since


def _reapply() -> None:
    if native_kernel.cache_info().currsize:
        kernel = native_kernel()
        if kernel is not None:
            _apply_activations(kernel)


def _apply_activations(kernel: NativeKernel) -> None:
    """cpu_activations() on a loaded kernel, int8 only once its self-check passes."""
    try:
        kind = cpu_activations()
    except ValueError as e:  # a mistyped environment variable costs speed, not the run
        warnings.warn(f"moe-pack: {e}; using int16", stacklevel=3)
        kind = "int16"
    if not kernel.set_act8(kind == "int8"):
        return
    if kernel.act8_problem is _UNCHECKED:  # once per kernel: models loaded one after another switch back and forth
        problem = self_check(kernel)
        if problem is not None and kernel.wide:
            # int8's 16-lane rows (vpdpbusd on AVX-512 VNNI) never ran on a CI machine: wrong ones
            # cost their lanes, not int8, and int16 keeps the 16-lane rows that passed
            kernel.act8_wide = False
            kernel.set_act8(True)
            if self_check(kernel) is None:
                warnings.warn(f"moe-pack: the CPU kernel's 16-lane int8 rows give wrong results on this machine "
                              f"({problem}); using its 8-lane int8 rows", stacklevel=3)
                problem = None
        kernel.act8_problem = problem
        if problem is not None:
            warnings.warn(f"moe-pack: the CPU kernel's int8 activations give wrong results on this machine "
                          f"({problem}); using int16", stacklevel=3)
    if kernel.act8_problem is not None:
        kernel.set_act8(False)


@functools.lru_cache(maxsize=1)
def native_kernel() -> NativeKernel | None:
    """The kernel, or None (disabled, no compiler, build failed, wrong results: the last three
    warn once)."""
    if os.environ.get("MOEPACK_CPU_KERNEL", "native") != "native":
        return None
    try:
        kernel = NativeKernel(build())
    except (NativeBuildError, OSError) as e:
        warnings.warn(f"moe-pack: CPU kernel not built ({e}); using the slower numba/torch path", stacklevel=2)
        return None
    kernel.set_wide(os.environ.get("MOEPACK_CPU_WIDE", "1") != "0")
    problem = self_check(kernel)
    if problem is not None and kernel.wide:
        # the 16-lane rows are built only where AVX-512 is, and no CI machine has it: a wrong
        # one costs their speed, not the kernel
        kernel.set_wide(False)
        if self_check(kernel) is None:
            warnings.warn(f"moe-pack: the CPU kernel's 16-lane rows give wrong results on this machine ({problem}); "
                          "using its 8-lane rows", stacklevel=2)
            problem = None
    if problem is not None:
        warnings.warn(f"moe-pack: the CPU kernel built at {kernel.path} gives wrong results on this machine "
                      f"({problem}); using the slower numba/torch path", stacklevel=2)
        return None
    _apply_activations(kernel)
    return kernel
