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
from quantize.tensors import expert_matrix_name
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


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantize_with_gptq_on_cuda_stores_what_the_cpu_does(tiny_checkpoint, tmp_path):
    """The whole --gptq run on the GPU (the calibration steps, the stored matrices decoded there,
    GPTQ): every matrix's error against the checkpoint as on the CPU, within what float32 on
    another device moves (a tie broken the other way is carried on by GPTQ)."""
    from quantize.convert import GptqOptions, quantize_checkpoint

    errors = []
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.moepack"
        quantize_checkpoint(str(tiny_checkpoint), out, device=device, progress=False, gptq=GptqOptions(TEXT, ctx=16))
        with MoepackFile(out) as f:
            f.verify()
            assert f.header.quantizer.method == "gptq"
            errors.append([t.rel_error for t in f.header.tensors if t.spec.quantized]
                          + [err for e in f.header.experts for err in e.rel_error])
    cpu, gpu = np.array(errors[0]), np.array(errors[1])
    assert cpu.shape == gpu.shape and cpu.size > 0
    np.testing.assert_allclose(gpu, cpu, rtol=0.1)
    assert abs(gpu.mean() - cpu.mean()) < 0.02 * cpu.mean()


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


def _windows(ckpt):
    from quantize.imatrix_checkpoint import checkpoint_windows

    return checkpoint_windows(ckpt.config, ckpt.tokenizer, TEXT, 16, None, ckpt.source)


class _Zeros:
    """The checkpoint's weights with the listed matrices as zeros (as the file can store them)."""

    def __init__(self, w, names):
        self.w, self.names = w, set(names)

    def get(self, name):
        return torch.zeros_like(self.w.get(name)) if name in self.names else self.w.get(name)

    def expert(self, layer, e, m):
        w = self.w.expert(layer, e, m)
        return torch.zeros_like(w) if expert_matrix_name(layer, e, m) in self.names else w


def _store_zeros(fits, name, shape, spec):
    """The writer's hand-off of `name` with every weight decoding to 0."""
    from formats.qtensor import encode_matrix

    assert fits.fit(name) is not None
    groups = shape[0] * shape[1] // spec.group_size
    fits.stored(name, encode_matrix(spec, q=np.zeros(shape, np.uint8), scale=np.ones(groups, np.float32),
                                    zero=np.zeros(groups, np.float32)), shape, spec)


def test_each_matrix_sees_its_inputs_through_the_stored_matrices_before_it(tiny_checkpoint):
    """GPTQ's sequential order, within a layer and across layers: with layer 0's q, k and v
    stored as zeros, o's inputs are zeros; with w1 of an expert stored as zeros, so are that
    w2's; and with all of layer 0 stored as zeros, layer 1 sees the embeddings. Through the
    float weights, none of that holds."""
    from quantize.gptq_calibration import GptqFits, _Grams
    from quantize.imatrix_checkpoint import first_hidden, run_layer
    from quantize.recipe import QuantRecipe
    from quantize.source import open_checkpoint
    from quantize.tensors import ExpertItem, TensorItem, plan_records

    ckpt = open_checkpoint(str(tiny_checkpoint))
    recipe = QuantRecipe(attn_bits=4, expert_bits=2).build(ckpt.config)
    plan = plan_records(ckpt.folder, ckpt.config)
    fits = GptqFits(ckpt, TEXT, 16, _windows(ckpt), "cpu", recipe)
    fits.check(plan)
    h0, _ = first_hidden(fits.weights, _windows(ckpt))  # layer 0's input
    p = "model.layers.0."
    attn = [p + f"self_attn.{m}_proj.weight" for m in ("q", "k", "v", "o")]
    shapes = {it.name: it.shape for it in plan if isinstance(it, TensorItem)}
    for name in attn[:3]:
        _store_zeros(fits, name, shapes[name], recipe["attention"])
    fits.fit(attn[3])
    rows = fits.grams.rows[attn[3]]
    assert rows == h0.shape[0] and not fits.grams.gram[attn[3]].any()
    _store_zeros(fits, attn[3], shapes[attn[3]], recipe["attention"])

    layer0 = [it for it in plan if isinstance(it, ExpertItem) and it.layer == 0]
    zeros, routed = set(attn), 0
    for item in layer0:
        for m, ref in item.refs:
            name = item.matrix_name(m)
            _store_zeros(fits, name, ref.shape, recipe["experts"])
            zeros.add(name)
            if m == "w2" and name in fits.grams.gram:
                routed += 1
                assert not fits.grams.gram[name].any()  # w1 stored as zeros: silu(0) * (x @ w3.T) = 0
    assert routed > 0

    q1 = "model.layers.1.self_attn.q_proj.weight"
    fits.fit(q1)
    assert fits.layer == 1
    want, through_float = _Grams(), _Grams()
    with torch.inference_mode():
        h1 = run_layer(ckpt.config, _Zeros(fits.weights, zeros), 0, h0, fits.spans, _Grams())
        run_layer(ckpt.config, fits.weights, 1, h1, fits.spans, want)
        h1_float = run_layer(ckpt.config, fits.weights, 0, h0, fits.spans, _Grams())
        run_layer(ckpt.config, fits.weights, 1, h1_float, fits.spans, through_float)
    torch.testing.assert_close(h1, h0)  # every matrix of layer 0 gives zeros: the residual alone
    torch.testing.assert_close(fits.grams.gram[q1], want.gram[q1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(through_float.gram[q1], want.gram[q1], rtol=1e-2)


def test_the_writer_hands_every_stored_matrix_to_the_steps_after_it(tiny_checkpoint, calib, tmp_path, monkeypatch):
    """Through quantize_checkpoint: when a step runs, every quantized matrix of the steps before
    it in its layer is there as stored bytes; every step runs; and a matrix with fewer than
    MIN_ROWS rows gets no GPTQ."""
    from quantize import gptq_calibration as gc
    from quantize.convert import GptqOptions, quantize_checkpoint
    from quantize.source import open_checkpoint

    passed, fits_given = [], []
    advance, fit = gc.GptqFits._advance, gc.GptqFits.fit

    def spy_advance(self):
        quantized = {n for n in self.step if n in self.layer_of}
        passed.append((self.layer, self.step, quantized <= set(self.stored_layer)))
        return advance(self)

    def spy_fit(self, name):
        out = fit(self, name)
        if out is not None and out.importance is not None:
            fits_given.append((self.grams.rows[name], out.gram is not None))
        return out

    monkeypatch.setattr(gc.GptqFits, "_advance", spy_advance)
    monkeypatch.setattr(gc.GptqFits, "fit", spy_fit)
    monkeypatch.setattr(gc, "MIN_ROWS", 200)
    r = quantize_checkpoint(str(tiny_checkpoint), tmp_path / "x.moepack", device="cpu", progress=False,
                            gptq=GptqOptions(TEXT, ctx=16))
    assert all(ok for _, _, ok in passed), [x for x in passed if not x[2]]
    steps = [(layer, step) for layer, step, _ in passed if step]
    cfg = open_checkpoint(str(tiny_checkpoint)).config
    per_layer = 2 + 2 * cfg.num_local_experts  # q/k/v, o, and each expert's w1/w3 and w2
    # every step of every layer is passed, but the last layer's last (nothing comes after it)
    assert len(steps) == per_layer * cfg.num_hidden_layers - 1 == len(set(steps))
    assert {rows >= 200 for rows, _ in fits_given} == {True, False}  # both kinds happen here
    assert all(has_gram == (rows >= 200) for rows, has_gram in fits_given)
    assert sum(r.calibrated_fits) == len(fits_given) + r.calibrated_fits[1]


def test_a_matrix_asked_for_out_of_file_order_is_a_bug_reported_as_such(tiny_checkpoint):
    from formats.errors import MoepackError
    from quantize.gptq_calibration import GptqFits
    from quantize.recipe import QuantRecipe
    from quantize.source import open_checkpoint
    from quantize.tensors import plan_records

    ckpt = open_checkpoint(str(tiny_checkpoint))
    fits = GptqFits(ckpt, TEXT, 16, _windows(ckpt), "cpu", QuantRecipe().build(ckpt.config))
    fits.check(plan_records(ckpt.folder, ckpt.config))
    fits.fit("model.layers.0.self_attn.o_proj.weight")
    with pytest.raises(MoepackError, match="q_proj.weight asked for after"):
        fits.fit("model.layers.0.self_attn.q_proj.weight")


def test_a_gram_matrix_with_nan_is_refused():
    from formats.errors import MoepackError

    W, x = _case()
    s, z = _fixed_meta(W, x, 2, 16)
    H = x.T @ x
    H[3, 4] = float("nan")
    with pytest.raises(MoepackError, match="non-finite"):
        gptq_codes(W, H, s, z, 2, 16)


def test_options_that_need_gptq_or_a_quantized_matrix(tiny_checkpoint, calib, tmp_path):
    out = tmp_path / "x.moepack"
    assert_user_error(run_cli("quantize", tiny_checkpoint, "-o", out, "--gptq-tokens", "100"), "--gptq-tokens")
    assert_user_error(run_cli("quantize", tiny_checkpoint, "-o", out, "--gptq", calib, "--attn-bits", "16",
                              "--expert-bits", "16"), "quantizes no matrix")
    assert not out.exists()


def test_lm_head_is_fitted_to_the_final_norm_of_the_stored_layers(tiny_checkpoint):
    """lm_head's step comes after the last layer: with every layer matrix stored as zeros, the
    layers pass the embeddings through, and lm_head's Gram matrix is the final norm's of them."""
    from quantize.gptq_calibration import GptqFits
    from quantize.imatrix_checkpoint import _rms_norm, first_hidden
    from quantize.recipe import QuantRecipe
    from quantize.source import open_checkpoint
    from quantize.tensors import ExpertItem, TensorItem, plan_records

    ckpt = open_checkpoint(str(tiny_checkpoint))
    recipe = QuantRecipe(attn_bits=4, expert_bits=2, lm_head_bits=4).build(ckpt.config)
    plan = plan_records(ckpt.folder, ckpt.config)
    fits = GptqFits(ckpt, TEXT, 16, _windows(ckpt), "cpu", recipe)
    fits.check(plan)
    h0, _ = first_hidden(fits.weights, _windows(ckpt))
    for item in plan:
        if isinstance(item, ExpertItem):
            for m, ref in item.refs:
                _store_zeros(fits, item.matrix_name(m), ref.shape, recipe["experts"])
        elif isinstance(item, TensorItem) and item.role == "attention":
            _store_zeros(fits, item.name, item.shape, recipe["attention"])
    fit = fits.fit("lm_head.weight")
    assert fit.gram is not None and fits.grams.rows["lm_head.weight"] == h0.shape[0]
    x = _rms_norm(h0, fits.weights.get("model.norm.weight"), ckpt.config.rms_norm_eps)
    torch.testing.assert_close(fit.gram, x.T @ x, rtol=1e-4, atol=1e-4)
    assert fits.equal == 0


def test_a_text_too_short_fails_before_the_hubs_weights_are_fetched(tiny_checkpoint, monkeypatch, tmp_path):
    import huggingface_hub

    from quantize.source import HUB_METADATA_FILES
    from tests.quantize.test_source import FakeHub

    import json
    import shutil

    repo = shutil.copytree(tiny_checkpoint, tmp_path / "repo")
    config = repo / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "add_bos_token": False}))
    fake = FakeHub(repo)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    short = tmp_path / "short.txt"
    short.write_text("a")  # one token, and no BOS before it
    out = tmp_path / "x.moepack"
    assert_user_error(run_cli("quantize", "someone/tiny-mixtral", "-o", out, "--gptq", short), "fewer than 2 tokens")
    assert_user_error(run_cli("imatrix", "someone/tiny-mixtral", short, "-o", tmp_path / "x.imatrix"),
                      "fewer than 2 tokens")
    assert [kw["allow_patterns"] for _, kw in fake.calls] == [HUB_METADATA_FILES] * 2  # config and tokenizer only
    assert not out.exists()
