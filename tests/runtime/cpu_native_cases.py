"""What the compiled CPU kernel's tests share (test_cpu_native.py, test_cpu_native_prompt.py,
test_cpu_native_callers.py, test_cpu_wide.py): the skip where no C compiler built it, the
kernel's rounding of x done in numpy, a call of the kernel on a packed matrix's bytes, the error
measure and tolerances, the matrix geometries every path is checked on, and the check that
tokens batched through one pass equal the same tokens one at a time.

The kernel rounds x to integers per 32-bit word of codes (scale: the word's largest |x| / 32767,
or / 6553 for 2-bit codes, whose pairs are telescoped) and is otherwise exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from formats.qtensor import QuantSpec
from runtime import cpu_native


# one expert against its exact float64 value: x's rounding, up to 2^-13.7 of each word's largest
# |x| for 2-bit codes, through two matrices (fp16's own rounding is 2^-11)
EXPERT_TOL = 5e-4

needs_native = pytest.mark.skipif(cpu_native.native_kernel() is None, reason="no C compiler: the kernel is not built")


def x_steps(bits: int) -> int:
    """Integer steps per word's largest |x|: 2-bit pairs are telescoped (x_p - 4 x_(p-1) must fit
    int16), so they get 6553 (2^-13.7); 3- and 4-bit codes get all of int16."""
    return 6553 if bits == 2 else 32767


def quantize_x(x: np.ndarray, cu: int, steps: int = 32767) -> np.ndarray:
    """x rounded as the kernel rounds it: per word of cu codes, to integer steps of max|x| / steps."""
    t, k = x.shape
    xw = x.reshape(t, k // cu, cu).astype(np.float64)
    m = np.abs(xw).max(-1, keepdims=True).astype(np.float32)
    d = (m / np.float32(steps)).astype(np.float64)
    inv = np.where(m > 0, np.float32(steps) / np.where(m > 0, m, 1), 0).astype(np.float32)
    q = np.rint(x.reshape(t, k // cu, cu) * inv)
    return (q * d).reshape(t, k)


def run(data, shape, spec, x, threads=1):
    """The compiled kernel on a packed matrix's bytes, as runtime.cpu_expert calls it."""
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    y = cpu_native.native_kernel().gemv(buf, cpu_native.matrix_descriptor(shape, spec), torch.from_numpy(x), threads)
    return None if y is None else y.numpy()


def rel(a, b) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))


# (spec, N, K): the fast path (meta decoded in registers) at every words-per-group it has
# (1, 2, 4, 8, 16), and the per-row path: meta groups not a multiple of 8 (5, 12), rows of
# groups not a multiple of 8, words per group not a power of two (g96 at 2 bits), row tails of
# fewer than 8 words (K 48)
CASES = [
    (QuantSpec(2, 16, 8, 128), 40, 256),  # Mixtral's experts: fast, 1 word per group
    (QuantSpec(2, 32, 8, 64), 24, 512),
    (QuantSpec(2, 128, 8, 8), 16, 1024),  # 8 words per group
    (QuantSpec(2, 256, 8, 16), 8, 1024),  # 16 words per group: several vector steps per group
    (QuantSpec(3, 64, 8, 128), 40, 512),  # the 3-bit default: fast, 4 words per group
    (QuantSpec(3, 16, 8, 8), 16, 256),
    (QuantSpec(4, 64, 8, 256), 24, 512),  # the attention default at 4 bits
    (QuantSpec(4, 8, 8, 24), 16, 128),  # 4-bit g8: 1 word per group
    (QuantSpec(2, 16, 8, 5), 24, 256),  # meta groups straddle rows: per-row path
    (QuantSpec(3, 64, 8, 12), 16, 320),  # 5 groups per row
    (QuantSpec(2, 96, 8, 128), 16, 384),  # 6 words per group
    (QuantSpec(2, 16, 8, 128), 24, 48),  # 3 words per row: scalar only
    (QuantSpec(3, 16, 8, 7), 8, 208),  # 13 words per row: a vector step and a scalar tail
    # 4-bit meta codes (format version 2): nibbles expanded in registers, and per group
    (QuantSpec(2, 16, 4, 128), 40, 256),
    (QuantSpec(3, 64, 4, 128), 40, 512),
    (QuantSpec(4, 64, 4, 256), 24, 512),
    (QuantSpec(2, 16, 4, 5), 24, 256),  # per-row path, odd meta groups
    (QuantSpec(3, 16, 4, 7), 8, 208),  # 13 groups per row: rows start on odd groups
    (QuantSpec(2, 96, 4, 128), 16, 384),
    # rows that end in a part of a block, and blocks across meta groups (8 lanes: meta groups of
    # 8 groups or more): the demo's SmolLM2 is 576 wide
    (QuantSpec(4, 64, 8, 256), 24, 576),  # 9 groups per row: a block and 1 group of 8 words
    (QuantSpec(2, 16, 4, 128), 40, 576),  # 36 groups: 4 blocks and 4 groups; rows cross meta groups mid-block
    (QuantSpec(2, 16, 8, 9), 24, 400),  # meta groups of 9: most blocks straddle two
    (QuantSpec(3, 64, 8, 12), 16, 704),  # 11 groups per row, meta groups of 12
    (QuantSpec(2, 32, 8, 64), 16, 352),  # 11 groups of 2 words: the last 3 in one vector step
    (QuantSpec(4, 128, 8, 16), 8, 1152),  # 9 groups of 16 words: the last group in two vector steps
    (QuantSpec(3, 64, 4, 128), 16, 576),  # 4-bit meta on rows of 9 groups: per-row path (mid-byte starts)
]


def assert_tokens_batch_exactly(gemv, data, shape, spec, x):
    """gemv (data, shape, spec, x [T, K]) -> [T, N] on T tokens at once equals it token by token,
    bit for bit: a pass over several tokens shares each pair of codes' decode, nothing else
    (integer dots are exact, and each token's float sums take the same steps in order)."""
    together = gemv(data, shape, spec, x)
    alone = np.concatenate([gemv(data, shape, spec, x[t:t + 1]) for t in range(x.shape[0])])
    assert np.array_equal(together, alone)
    return together


def check_expert_and_row_cut(kernel, spec: QuantSpec, hidden: int, inter: int, x: torch.Tensor, tol: float) -> None:
    """kernel.expert (moepack_expert) on a random expert: h and y within `tol` (relative) of their
    exact float64 values, and the row cut from inter // 2 (the hybrid split's CPU rows) equal to
    the same rows of h bit for bit."""
    from tests.runtime.kernel_cases import make_expert

    layout, data, ref = make_expert(hidden, inter, spec, seed=7)
    record = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    h_ref = torch.nn.functional.silu(x.double() @ torch.from_numpy(ref["w1"]).double().T) * (
        x.double() @ torch.from_numpy(ref["w3"]).double().T)
    y_ref = h_ref @ torch.from_numpy(ref["w2"]).double().T
    h, y = kernel.expert(record, cpu_native.expert_descriptor(layout), x, inter, hidden, 2)
    assert float((h.double() - h_ref).norm() / h_ref.norm()) < tol
    assert float((y.double() - y_ref).norm() / y_ref.norm()) < tol
    cut = inter // 2
    h_cut, none = kernel.expert(record, cpu_native.expert_descriptor(layout, cut), x, inter - cut, None, 2)
    assert none is None and torch.equal(h_cut, h[:, cut:])


# (bits, group, meta bits) of the quantizer's defaults, for which the byte path is built
INT8_DEFAULTS = [(2, 16, 8), (2, 16, 4), (3, 64, 8), (3, 64, 4), (4, 64, 8)]


def takes_int8(spec: QuantSpec, k: int) -> bool:
    """Where the byte path should run: a default geometry on the fast path (whole blocks of 8
    groups that tile rows and meta groups, or rows of 8 groups or more with meta groups of 8 or
    more, not starting mid-byte with 4-bit meta codes)."""
    gpr, mg = k // spec.group_size, spec.meta_group_size
    fast = (gpr % 8 == 0 and mg % 8 == 0) or (gpr >= 8 and mg >= 8 and not (spec.meta_bits == 4 and gpr % 2))
    return fast and (spec.bits, spec.group_size, spec.meta_bits) in INT8_DEFAULTS
