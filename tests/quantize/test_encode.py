"""quantize.encode builds a matrix's bytes in torch on hqq's device: the same bytes as the
numpy reference encoder (formats.qtensor.encode_matrix), the same recorded error as a numpy
decode of them, whatever the shape, bit width, meta width or thread count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from formats.qtensor import QuantSpec, component_views, decode_matrix, encode_matrix
from formats.qtensor import encode_meta as encode_meta_np
from quantize.encode import encode_codes, encode_meta, stored_error
from quantize.hqq_codec import relative_error

SPECS = [QuantSpec(2, 16, 4, 128), QuantSpec(2, 16, 8, 128), QuantSpec(3, 64, 8, 128), QuantSpec(3, 64, 4, 128),
         QuantSpec(4, 64, 4, 256), QuantSpec(4, 64, 16, 0), QuantSpec(2, 16, 16, 0), QuantSpec(8, 64, 8, 256),
         QuantSpec(2, 8, 4, 3), QuantSpec(3, 32, 8, 5)]  # meta groups that do not divide the group count


def _inputs(rows: int, cols: int, spec: QuantSpec, seed: int, flat_groups: bool = False):
    """A weight matrix and hqq-like codes, scales and zeros for it (random, not fitted)."""
    rng = np.random.default_rng(seed)
    W = torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32) * 0.02).half()
    g = rows * cols // spec.group_size
    q = rng.integers(0, 1 << spec.bits, (rows, cols), dtype=np.uint8)
    scale = rng.uniform(0.001, 0.02, g).astype(np.float32)
    zero = rng.uniform(0, (1 << spec.bits) - 1, g).astype(np.float32)
    if flat_groups:  # a constant meta group (step 0) and groups whose scale decodes to 0
        scale[: min(g, 2 * max(1, spec.meta_group_size))] = 0.0
        zero[: min(g, max(1, spec.meta_group_size))] = 1.0
    return W, q, scale, zero


def _refit_np(W, q, scale, zero, spec) -> np.ndarray:
    """numpy's re-rounding: each code the nearest under the decoded meta; hqq's where s is 0."""
    rows, cols = q.shape
    s_hat, z_hat = (encode_meta_np(v, spec)[2].reshape(rows, -1, 1) for v in (scale, zero))
    w = W.float().numpy().reshape(rows, -1, spec.group_size)
    new = np.clip(np.rint(w / np.where(s_hat == 0, np.float32(1), s_hat) + z_hat), 0, (1 << spec.bits) - 1)
    return np.where(s_hat == 0, q.reshape(new.shape), new.astype(np.uint8)).reshape(rows, cols)


def _reference(W, q, scale, zero, spec) -> bytes:
    """The numpy encoder's bytes, with the codes re-rounded in numpy at 4-bit meta."""
    if spec.meta_bits == 4:
        q = _refit_np(W, q, scale, zero, spec)
    return encode_matrix(spec, q=q, scale=scale, zero=zero)


def _torch(W, q, scale, zero, spec):
    return encode_codes(W, torch.from_numpy(q), torch.from_numpy(scale), torch.from_numpy(zero), spec)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe().replace(" ", ""))
@pytest.mark.parametrize("flat", [False, True], ids=["random", "flat-groups"])
def test_same_bytes_as_the_numpy_encoder(spec, flat):
    cols = 4 * max(spec.group_size, 64)
    W, q, scale, zero = _inputs(37, cols, spec, seed=spec.bits, flat_groups=flat)
    buf = _torch(W, q, scale, zero, spec)
    assert buf.dtype == torch.uint8 and buf.dim() == 1
    assert buf.numpy().tobytes() == _reference(W, q, scale, zero, spec)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 24), groups=st.integers(1, 6), spec=st.sampled_from(SPECS), seed=st.integers(0, 2**16),
       flat=st.booleans())
def test_round_trip_property(rows, groups, spec, seed, flat):
    cols = groups * spec.group_size
    W, q, scale, zero = _inputs(rows, cols, spec, seed, flat_groups=flat)
    buf = _torch(W, q, scale, zero, spec)
    ref = _reference(W, q, scale, zero, spec)
    assert buf.numpy().tobytes() == ref
    decoded = decode_matrix(component_views(ref, (rows, cols), spec), (rows, cols), spec)
    assert stored_error(W, buf, spec) == pytest.approx(relative_error(W, decoded), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("spec", [QuantSpec(2, 16, 4, 128), QuantSpec(4, 64, 8, 256), QuantSpec(2, 8, 4, 3)],
                         ids=lambda s: s.describe().replace(" ", ""))
def test_meta_codes_match_numpy(spec):
    rng = np.random.default_rng(3)
    for values in (rng.uniform(0.001, 0.02, 1000).astype(np.float32), np.full(300, 0.5, np.float32),
                   np.array([7.0], np.float32)):
        codes, meta, decoded = encode_meta(torch.from_numpy(values), spec)
        ref_codes, ref_meta, ref_decoded = encode_meta_np(values, spec)
        np.testing.assert_array_equal(codes.numpy(), ref_codes)
        np.testing.assert_array_equal(meta.numpy(), ref_meta)
        np.testing.assert_array_equal(decoded.numpy(), ref_decoded)


def test_non_finite_meta_is_left_to_the_reference():
    spec = QuantSpec(2, 16, 16, 0)
    W, q, scale, zero = _inputs(8, 64, spec, seed=0)
    zero[3] = 1e6  # past float16's range: the fp16 component would hold inf
    assert _torch(W, q, scale, zero, spec) is None
    spec8 = QuantSpec(2, 16, 8, 128)
    scale[5] = np.inf
    assert _torch(W, q, scale, zero, spec8) is None


def test_recorded_error_is_the_same_at_any_thread_count():
    """torch's float64 dot splits its sum by thread; the per-row sums and their exact total do not."""
    spec = QuantSpec(2, 16, 4, 128)
    W, q, scale, zero = _inputs(300, 2048, spec, seed=1)
    buf = _torch(W, q, scale, zero, spec)
    threads = torch.get_num_threads()
    try:
        errs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            errs.append(stored_error(W, buf, spec))
    finally:
        torch.set_num_threads(threads)
    assert errs[0] == errs[1] == errs[2]


def test_zero_matrix_errors():
    spec = QuantSpec(2, 16, 8, 128)
    W = torch.zeros(4, 32, dtype=torch.float16)
    q = np.zeros((4, 32), np.uint8)
    exact = _torch(W, q, np.ones(8, np.float32), np.zeros(8, np.float32), spec)
    assert stored_error(W, exact, spec) == 0.0
    off = _torch(W, q, np.ones(8, np.float32), np.full(8, 1.0, np.float32), spec)  # decodes to -1 everywhere
    assert stored_error(W, off, spec) == 1.0


def test_chunked_rows_give_the_same_bytes(monkeypatch):
    """The row loops of the re-rounding and the error check split a matrix anywhere."""
    import quantize.encode as enc

    spec = QuantSpec(2, 16, 4, 128)
    W, q, scale, zero = _inputs(50, 256, spec, seed=2)
    whole = _torch(W, q, scale, zero, spec)
    err = stored_error(W, whole, spec)
    monkeypatch.setattr(enc, "CHUNK", 256 * 7)  # 7 rows a chunk: the last chunk is short
    assert torch.equal(_torch(W, q, scale, zero, spec), whole)
    assert stored_error(W, whole, spec) == err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe().replace(" ", ""))
def test_the_gpu_builds_the_same_bytes(spec):
    W, q, scale, zero = _inputs(333, 8 * spec.group_size, spec, seed=5, flat_groups=True)
    cpu = _torch(W, q, scale, zero, spec)
    gpu = encode_codes(W.cuda(), torch.from_numpy(q).cuda(), torch.from_numpy(scale).cuda(),
                       torch.from_numpy(zero).cuda(), spec)
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
    assert stored_error(W.cuda(), gpu, spec) == pytest.approx(stored_error(W, cpu, spec), rel=1e-12)
