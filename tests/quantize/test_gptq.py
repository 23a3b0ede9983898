"""quantize/gptq.py: codes by GPTQ for fixed scale and zero; and `quantize --gptq`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from formats.qtensor import QuantSpec
from formats.reader import MoepackFile
from quantize.encode import stored_meta
from quantize.fit import weighted_fit
from quantize.gptq import gptq_codes
from quantize.hqq_codec import Weighted, encode_tensor
from runtime.dequant import component_tensors, dequantize
from tests.quantize.helpers import one_torch_thread  # noqa: F401 (autouse fixture)
from tests.quantize.helpers import assert_user_error, run_cli, sha256
from tests.quantize.test_imatrix import TEXT


def _case(rows=48, cols=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen) * 0.02
    # inputs near a low-rank subspace, as a real layer's are: columns move together
    x = torch.randn(1024, 16, generator=gen) @ torch.randn(16, cols, generator=gen)
    return W, x + 0.3 * torch.randn(1024, cols, generator=gen)


def _fixed_meta(W, x, bits, g):
    _, scale, zero = weighted_fit(W, (x * x).mean(0), bits, g)
    rows, groups = W.shape[0], W.shape[1] // g
    return scale.view(rows, groups), zero.view(rows, groups)


def _nearest(W, s, z, bits, g):
    rows, cols = W.shape
    w = W.view(rows, -1, g)
    return torch.round(w / s[..., None] + z[..., None]).clamp(0, (1 << bits) - 1).to(torch.uint8).view(rows, cols)


def _decode(q, s, z, g):
    rows, cols = q.shape
    return ((q.float().view(rows, -1, g) - z[..., None]) * s[..., None]).view(rows, cols)


@pytest.mark.parametrize("bits,g", [(2, 16), (3, 64), (4, 32)])
def test_gptq_cuts_the_output_error_below_nearest_rounding(bits, g):
    W, x = _case()
    s, z = _fixed_meta(W, x, bits, g)
    q = gptq_codes(W, x.T @ x, s, z, bits, g)
    assert q.dtype == torch.uint8 and q.shape == W.shape and int(q.max()) <= (1 << bits) - 1
    err_gptq = float((x @ (W - _decode(q, s, z, g)).T).norm())
    err_near = float((x @ (W - _decode(_nearest(W, s, z, bits, g), s, z, g)).T).norm())
    assert err_gptq < 0.6 * err_near, (err_gptq, err_near)


def test_uncorrelated_inputs_give_nearest_rounding():
    """With a diagonal H no column's error can be cancelled by another's: GPTQ is rounding."""
    W, _ = _case()
    gen = torch.Generator().manual_seed(1)
    H = torch.diag(torch.rand(W.shape[1], generator=gen) + 0.5)
    s, z = _fixed_meta(W, torch.ones(4, W.shape[1]), 2, 16)
    assert torch.equal(gptq_codes(W, H, s, z, 2, 16), _nearest(W, s, z, 2, 16))


def test_columns_never_driven_round_to_nearest_and_pass_no_error():
    W, x = _case(seed=2)
    x[:, 5] = 0
    x[:, 70] = 0
    s, z = _fixed_meta(W, x, 2, 16)
    q = gptq_codes(W, x.T @ x, s, z, 2, 16)
    near = _nearest(W, s, z, 2, 16)
    assert torch.equal(q[:, 5], near[:, 5]) and torch.equal(q[:, 70], near[:, 70])
    # the result does not depend on the dead columns' weights
    W2 = W.clone()
    W2[:, 5] += 0.05
    q2 = gptq_codes(W2, x.T @ x, s, z, 2, 16)
    live = [c for c in range(W.shape[1]) if c not in (5, 70)]
    assert torch.equal(q2[:, live], q[:, live])


def test_deterministic_and_a_rank_poor_gram_still_works():
    W, x = _case(seed=4)
    s, z = _fixed_meta(W, x, 2, 16)
    few = x[:3]  # rank 3 of 128: only damping makes it invertible
    a = gptq_codes(W, few.T @ few, s, z, 2, 16)
    b = gptq_codes(W, few.T @ few, s, z, 2, 16)
    assert torch.equal(a, b)


@pytest.mark.parametrize("meta_bits", [4, 8, 16])
def test_the_stored_bytes_hold_gptqs_codes_for_the_stored_meta(meta_bits):
    """No re-rounding after GPTQ (it would undo the error feedback): the file's codes are
    GPTQ's for the scale and zero the file decodes to."""
    W, x = _case(rows=32, cols=256, seed=5)
    spec = QuantSpec(2, 16, meta_bits, 0 if meta_bits == 16 else 128)
    imp = (x * x).mean(0).numpy()
    gram = x.T @ x
    buf, err = encode_tensor(W, spec, "cpu", "w", Weighted(imp, gram))
    _, scale, zero = weighted_fit(W, torch.from_numpy(imp), 2, 16)
    s_hat, z_hat = stored_meta(scale, zero, spec)
    want = gptq_codes(W, gram, s_hat.view(32, -1), z_hat.view(32, -1), 2, 16)
    t = torch.frombuffer(bytearray(buf), dtype=torch.uint8)
    stored = dequantize(component_tensors(t, (32, 256), spec), (32, 256), spec, torch.float32)
    np.testing.assert_allclose(stored.numpy(), _decode(want, s_hat.view(32, -1), z_hat.view(32, -1), 16).numpy(),
                               rtol=0, atol=1e-7)
    plain, _ = encode_tensor(W, spec, "cpu", "w", Weighted(imp))
    plain_w = dequantize(component_tensors(torch.frombuffer(bytearray(plain), dtype=torch.uint8), (32, 256), spec),
                         (32, 256), spec, torch.float32)
    assert float((x @ (W - stored).T).norm()) < float((x @ (W - plain_w).T).norm())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gptq_on_cuda_matches_the_cpu():
    """quantize --device cuda runs GPTQ where the weights are: the same output error, though
    float32 on another device may break a tie the other way and carry it on."""
    W, x = _case(rows=256, cols=512, seed=7)
    s, z = _fixed_meta(W, x, 2, 16)
    cpu = gptq_codes(W, x.T @ x, s, z, 2, 16)
    gpu = gptq_codes(W.cuda(), (x.T @ x).cuda(), s.cuda(), z.cuda(), 2, 16).cpu()
    e_cpu = float((x @ (W - _decode(cpu, s, z, 16)).T).norm())
    e_gpu = float((x @ (W - _decode(gpu, s, z, 16)).T).norm())
    assert abs(e_gpu - e_cpu) < 0.02 * e_cpu, (e_cpu, e_gpu)
    assert float((cpu != gpu).float().mean()) < 0.05


# ------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("gptq") / "calib.txt"
    path.write_text(TEXT)
    return path


def test_quantize_with_gptq_is_deterministic_and_recorded(tiny_checkpoint, calib, tmp_path):
    a, b = tmp_path / "a.moepack", tmp_path / "b.moepack"
    for out in (a, b):
        r = run_cli("quantize", tiny_checkpoint, "-o", out, "--gptq", calib, "--gptq-ctx", "16", "--device", "cpu",
                    "--quiet")
        assert r.exit_code == 0, r.stderr
        assert f"weighted by GPTQ over {calib}: " in r.stdout
    assert sha256(a) == sha256(b)
    with MoepackFile(a) as f:
        f.verify()
        q = f.header.quantizer
        assert q.method == "gptq" and "tokens of text sha256:" in q.method_version and "windows of 16" in q.method_version


def test_gptq_refuses_what_it_cannot_use(tiny_checkpoint, calib, tmp_path, tmp_path_factory):
    out = tmp_path / "x.moepack"
    assert_user_error(run_cli("quantize", tiny_checkpoint, "-o", out, "--gptq", calib, "--imatrix", calib),
                      "--gptq and --imatrix")
    assert_user_error(run_cli("quantize", tiny_checkpoint, "-o", out, "--gptq", calib, "--gptq-ctx", "1"),
                      "--gptq-ctx 1")
    assert_user_error(run_cli("quantize", tiny_checkpoint, "-o", out, "--gptq", tmp_path / "none.txt"), "none.txt")
    assert_user_error(run_cli("quantize", tiny_checkpoint, "-o", out, "--gptq", calib, "--attn-bits", "16",
                              "--expert-bits", "16"), "--gptq")
    assert not out.exists()


def test_each_layer_sees_its_inputs_through_the_stored_layers_before_it(tiny_checkpoint):
    """Layer 1's Gram matrices come from layer 0 as the file stores it, not from its float
    weights: here layer 0's experts are stored as zeros, so layer 1 sees attention alone."""
    from formats.qtensor import encode_matrix
    from quantize.gptq_calibration import GptqFits, _Grams
    from quantize.imatrix_checkpoint import run_layer
    from quantize.recipe import QuantRecipe
    from quantize.source import open_checkpoint
    from quantize.tensors import ExpertItem, plan_records

    ckpt = open_checkpoint(str(tiny_checkpoint))
    recipe = QuantRecipe(attn_bits=16, expert_bits=2).build(ckpt.config)
    plan = plan_records(ckpt.folder, ckpt.config)
    fits = GptqFits(ckpt, TEXT, 16, None, "cpu", recipe)
    fits.check(plan)
    h0 = fits.h.clone()
    spec = recipe["experts"]
    for item in plan:
        if isinstance(item, ExpertItem) and item.layer == 0:
            for m, ref in item.refs:
                name = f"{item.name}.{m}.weight"
                assert fits.fit(name) is not None
                groups = ref.shape[0] * ref.shape[1] // spec.group_size
                zeros = encode_matrix(spec, q=np.zeros(ref.shape, np.uint8), scale=np.ones(groups, np.float32),
                                      zero=np.zeros(groups, np.float32))
                fits.stored(name, zeros, ref.shape, spec)
    q1 = "model.layers.1.self_attn.q_proj.weight"
    first_expert = "model.layers.1.block_sparse_moe.experts.0.w1.weight"
    fits.fit(first_expert)  # runs layer 1 (attention is float16 here: not asked for)

    class NoExperts:
        def __init__(self, w):
            self.w = w

        def get(self, name):
            return self.w.get(name)

        def expert(self, layer, e, m):
            return torch.zeros_like(self.w.expert(layer, e, m))

    want = _Grams()
    with torch.inference_mode():
        h1 = run_layer(ckpt.config, NoExperts(fits.weights), 0, h0, fits.spans, _Grams())
        run_layer(ckpt.config, fits.weights, 1, h1, fits.spans, want)
    assert fits.layer == 1
    np.testing.assert_allclose(fits.grams.gram[first_expert].numpy(), want.gram[first_expert].numpy(), rtol=1e-4,
                               atol=1e-4)
    # and through layer 0's float experts they differ
    float_grams = _Grams()
    with torch.inference_mode():
        run_layer(ckpt.config, fits.weights, 1, run_layer(ckpt.config, fits.weights, 0, h0, fits.spans, _Grams()),
                  fits.spans, float_grams)
    assert not torch.allclose(float_grams.gram[q1], want.gram[q1], rtol=1e-2)


def test_the_writer_hands_every_stored_matrix_to_the_next_layer(tiny_checkpoint, calib, tmp_path, monkeypatch):
    """Through quantize_checkpoint: when layer L runs, every quantized matrix of layer L - 1 is
    there as stored bytes; and a matrix with fewer than MIN_ROWS rows gets no GPTQ."""
    from quantize import gptq_calibration as gc
    from quantize.convert import GptqOptions, quantize_checkpoint

    seen, fits_given = [], []
    run, fit = gc.GptqFits._run, gc.GptqFits.fit

    def spy_run(self, layer):
        if layer > 0:
            want = {n for n, L in self.layer_of.items() if L == layer - 1}
            seen.append((layer, want, set(self.stored_layer)))
        return run(self, layer)

    def spy_fit(self, name):
        out = fit(self, name)
        if out is not None and out.importance is not None:
            fits_given.append((self.grams.rows[name], out.gram is not None))
        return out

    monkeypatch.setattr(gc.GptqFits, "_run", spy_run)
    monkeypatch.setattr(gc.GptqFits, "fit", spy_fit)
    monkeypatch.setattr(gc, "MIN_ROWS", 200)
    quantize_checkpoint(str(tiny_checkpoint), tmp_path / "x.moepack", device="cpu", progress=False,
                        gptq=GptqOptions(TEXT, ctx=16))
    assert seen and all(want == stored and want for _, want, stored in seen), seen
    assert {rows >= 200 for rows, _ in fits_given} == {True, False}  # both kinds happen here
    assert all(has_gram == (rows >= 200) for rows, has_gram in fits_given)


def test_a_gram_matrix_with_nan_is_refused():
    from formats.errors import MoepackError

    W, x = _case()
    s, z = _fixed_meta(W, x, 2, 16)
    H = x.T @ x
    H[3, 4] = float("nan")
    with pytest.raises(MoepackError, match="non-finite"):
        gptq_codes(W, H, s, z, 2, 16)


def test_options_that_need_gptq_or_a_layer_matrix(tiny_checkpoint, calib, tmp_path):
    out = tmp_path / "x.moepack"
    assert_user_error(run_cli("quantize", tiny_checkpoint, "-o", out, "--gptq-tokens", "100"), "--gptq-tokens")
    assert_user_error(run_cli("quantize", tiny_checkpoint, "-o", out, "--gptq", calib, "--attn-bits", "16",
                              "--expert-bits", "16", "--lm-head-bits", "4"), "no attention or expert matrix")
    assert not out.exists()
