"""The decode step's small fused kernels (runtime.kernels.decode_ops) against the torch ops
they replace (runtime.rmsnorm, runtime.moe.route, runtime.rope, runtime.kv_cache), and the
split-key attention (decode_ops.attend) against torch's scaled_dot_product_attention with the
mask runtime.attention builds: under the Triton interpreter on the CPU, compiled on CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.attention import attention_mask
from runtime.kv_cache import KVCache
from runtime.moe import route
from runtime.rmsnorm import RMSNorm
from runtime.rope import Rotary

from .interpreter import CUDA, interpreted_kernels, use_interpreter

interpreted_kernels()
DEV = "cuda" if CUDA else "cpu"
# on a GPU these run compiled: `pytest -m cuda` (tools/gpu_all.sh) must select them
pytestmark = [pytest.mark.cuda] if CUDA else []
DTYPES = [torch.float32] + ([torch.float16, torch.bfloat16] if CUDA else [])


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    use_interpreter(monkeypatch)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    # float32: the same operations up to summation order; half types: one rounding apart
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,parts", [(64, None), (96, 1), (64, 3), (4096, 4), (40, 0)])
def test_add_rms_norm_is_the_residual_add_then_rmsnorm(dtype, hidden, parts):
    from runtime.kernels.decode_ops import add_rms_norm

    g = torch.Generator().manual_seed(hidden)
    t = 2
    h = torch.randn(t, hidden, generator=g).to(DEV, dtype)
    norm = RMSNorm(torch.rand(hidden, generator=g).add(0.5).to(DEV, dtype), 1e-5)
    if parts is None:
        y, want_h = None, h
    elif parts == 0:  # a plain GEMV output [T, H] in the model dtype
        y = torch.randn(t, hidden, generator=g).to(DEV, dtype)
        want_h = h + y
    else:  # float32 partials [P, T, H]
        y = torch.randn(parts, t, hidden, generator=g).to(DEV)
        want_h = h + y.sum(0).to(dtype)
    got_h, got_x, *_ = add_rms_norm(h, y, norm.weight, norm.eps)
    _close(got_h, want_h, dtype)
    _close(got_x, norm(want_h), dtype)
    if y is None:
        assert got_h is h  # nothing added: no copy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("experts,top_k", [(8, 2), (4, 1), (6, 3), (2, 2)])
def test_add_rms_norm_routes_as_the_router(dtype, experts, top_k):
    from runtime.kernels.decode_ops import add_rms_norm

    g = torch.Generator().manual_seed(experts * 10 + top_k)
    hidden, t = 128, 3
    h = torch.randn(t, hidden, generator=g).to(DEV, dtype)
    y = torch.randn(2, t, hidden, generator=g).to(DEV)
    router = (torch.randn(experts, hidden, generator=g) * 0.3).to(DEV, dtype)
    norm = RMSNorm(torch.rand(hidden, generator=g).add(0.5).to(DEV, dtype), 1e-6)
    h2, x, idx, w, _ = add_rms_norm(h, y, norm.weight, norm.eps, router, top_k)
    want_x = norm(h + y.sum(0).to(dtype))
    want_idx, want_w = route(want_x, router, top_k)
    _close(x, want_x, dtype)
    assert idx.dtype == torch.long and w.dtype == dtype and idx.shape == (t, top_k)
    if dtype == torch.float32:
        assert torch.equal(idx, want_idx)
    else:
        # half-precision logits may tie or round apart (another summation order than the
        # matmul's): the chosen experts must be the best ones up to that rounding
        probs = torch.softmax((want_x.float() @ router.float().T).to(dtype).float(), -1)
        torch.testing.assert_close(probs.gather(1, idx), probs.topk(top_k, -1).values, rtol=0, atol=1e-2)
    _close(w.sort(-1).values, want_w.sort(-1).values, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,parts,pos", [(4, 2, None, 5), (8, 8, 3, 0), (4, 1, 1, 31), (32, 8, 4, 17)])
def test_rotary_into_cache_is_rotary_then_the_cache_write(dtype, heads, kv_heads, parts, pos):
    from runtime.kernels.decode_ops import rotary_into_cache

    d, ctx = 16 if heads < 32 else 128, 32
    g = torch.Generator().manual_seed(heads + pos)
    n = (heads + 2 * kv_heads) * d
    if parts is None:
        y = torch.randn(1, n, generator=g).to(DEV, dtype)
        yd = y
    else:
        y = torch.randn(parts, 1, n, generator=g).to(DEV)
        yd = y.sum(0).to(dtype)
    rot = Rotary(d, 10000.0, ctx, DEV, dtype)
    p = torch.tensor([pos], device=DEV)
    want_cache, got_cache = (KVCache(1, kv_heads, d, ctx, DEV, dtype) for _ in range(2))
    for c in (want_cache, got_cache):
        c.layers[0].normal_(generator=None)
    got_cache.layers[0].copy_(want_cache.layers[0])
    cos, sin = rot.rows(p)
    q = Rotary.apply(yd[:, : heads * d].view(1, heads, d), cos, sin)
    k = Rotary.apply(yd[:, heads * d: (heads + kv_heads) * d].view(1, kv_heads, d), cos, sin)
    v = yd[:, (heads + kv_heads) * d:].view(1, kv_heads, d)
    want_cache.write_at(0, p, k, v)
    got_q = rotary_into_cache(y, heads, kv_heads, d, rot.cos, rot.sin_signed, p, got_cache.layers[0])
    _close(got_q, q.reshape(1, -1), dtype)
    _close(got_cache.layers[0], want_cache.layers[0], dtype)  # also: nothing else written


@pytest.mark.parametrize("hidden,per,int_x", [(64, 16, True), (4096, 16, True), (96, 8, True), (64, 8, False),
                                              (4096, 4, False), (80, 16, True)])
def test_add_rms_norm_writes_the_gemvs_input_format(hidden, per, int_x):
    """fmt: x also as qgemv.permute_x or quantize_x would convert it for the GEMV after."""
    from runtime.kernels.decode_ops import add_rms_norm
    from runtime.kernels.qgemv import XFormat, permute_x, quantize_x

    g = torch.Generator().manual_seed(hidden + per)
    h = torch.randn(2, hidden, generator=g).to(DEV)
    out = add_rms_norm(h, torch.randn(3, 2, hidden, generator=g).to(DEV), torch.rand(hidden, generator=g).to(DEV),
                       1e-5, fmt=XFormat(per, int_x))
    want = quantize_x(out.x, per) if int_x else permute_x(out.x, per)
    assert out.prepared.dtype == want.dtype and torch.equal(out.prepared, want)


def test_prepared_activations_must_match_the_launch():
    """qgemv.run_gemv takes a producer's `prepared` x only in its launch's own input format."""
    from formats.qtensor import QuantSpec
    from runtime.kernels.configs import GemvConfig
    from runtime.kernels.qgemv import launch_plan, permute_x, prepared_ok, quantize_x, x_format

    x = torch.randn(1, 256)
    spec = QuantSpec(2, 16, 8, 128)
    as_int = launch_plan(x, (64, 256), spec, False, GemvConfig(block_k=256, int_x=True))
    as_perm = launch_plan(x, (64, 256), spec, False, GemvConfig(block_k=256, permute_x=True))
    plain = launch_plan(x, (64, 256), spec, False, GemvConfig(block_k=256, permute_x=False))
    assert x_format(as_int).int_x and not x_format(as_perm).int_x and x_format(plain) is None
    assert prepared_ok(quantize_x(x, 16), as_int, 1) and not prepared_ok(permute_x(x, 16), as_int, 1)
    assert prepared_ok(permute_x(x, 16), as_perm, 1) and not prepared_ok(quantize_x(x, 16), as_perm, 1)
    assert not prepared_ok(permute_x(x, 16), plain, 1)  # nothing to prepare
    assert not prepared_ok(quantize_x(torch.randn(2, 256), 16), as_int, 1)  # rows


def test_add_rms_norm_refuses_a_hidden_size_of_part_words():
    from formats.errors import ConfigError
    from runtime.kernels.decode_ops import add_rms_norm
    from runtime.kernels.qgemv import XFormat

    with pytest.raises(ConfigError, match="not a whole number of 16-code words"):
        add_rms_norm(torch.zeros(1, 40, device=DEV), None, torch.ones(40, device=DEV), 1e-5, fmt=XFormat(16, True))


def test_gemv_outputs_of_the_wrong_shape_are_refused():
    from formats.errors import ConfigError
    from runtime.kernels.decode_ops import add_rms_norm

    h = torch.zeros(1, 64, device=DEV)
    with pytest.raises(ConfigError, match=r"does not match \[P, 1, 64\]"):
        add_rms_norm(h, torch.zeros(2, 1, 32, device=DEV), torch.ones(64, device=DEV), 1e-5)


def _reference(q, cache, pos, keys, window):
    """runtime.attention's _attend: SDPA over the first `keys` positions, masked as attention_mask."""
    _, g, _, d = cache.shape
    r = q.shape[1] // d // g
    allowed = attention_mask(1, pos, window, q.device)  # [1, pos + 1] or None
    mask = torch.zeros(keys, dtype=torch.bool, device=q.device)
    mask[: pos + 1] = True if allowed is None else allowed[0]
    bias = torch.zeros(keys, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(q.view(g, r, d)[None], cache[0, :, :keys][None], cache[1, :, :keys][None],
                                         attn_mask=bias.expand(r, -1))[0]
    return out.reshape(1, -1)


def _case(heads, kv_heads, d, ctx, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads * d, generator=g).to(DEV, dtype)
    cache = torch.randn(2, kv_heads, ctx, d, generator=g).to(DEV, dtype)
    return q, cache


# fp16 runs on the CPU too (the interpreter's bf16 tl.dot is not exact enough to check against)
ATTEND_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


@pytest.mark.parametrize("sms", [None, 132])  # None: this device's; 132: an H100's split count on any device
@pytest.mark.parametrize("dtype", ATTEND_DTYPES)
@pytest.mark.parametrize("heads,kv_heads,d,ctx,keys,pos,window", [
    (8, 2, 16, 64, 64, 0, None),  # the first token: one key
    (8, 2, 16, 64, 64, 63, None),  # every key
    (4, 4, 32, 300, 256, 130, None),  # no grouping; keys past pos in the bucket unseen
    (32, 8, 128, 1024, 1024, 577, None),  # Mixtral's heads at the #6 benchmark's depth
    (12, 2, 16, 200, 200, 150, 40),  # a sliding window: keys 111..150
    (6, 3, 64, 96, 96, 20, 64),  # a window longer than the position
    (16, 1, 16, 2048, 2048, 1999, None),  # one kv head, 16 query heads: tl.dot's rows exactly
])
def test_attend_is_sdpa_over_what_the_token_sees(monkeypatch, sms, dtype, heads, kv_heads, d, ctx, keys, pos, window):
    from runtime.kernels import decode_ops
    from runtime.kernels.decode_ops import attend

    if sms is not None:  # more splits than one combine block (16) at 1024 keys and up
        monkeypatch.setattr(decode_ops, "_sm_count", lambda device: sms)

    q, cache = _case(heads, kv_heads, d, ctx, dtype, seed=pos + heads)
    p = torch.tensor([pos], device=DEV)
    out, xf = attend(q, cache, p, keys, window)
    assert xf is None and out.dtype == dtype and out.shape == (1, heads * d)
    want = _reference(q, cache, pos, keys, window)
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol)


def test_attend_reads_no_key_the_token_does_not_see():
    from runtime.kernels.decode_ops import attend

    q, cache = _case(8, 2, 16, 256, torch.float32, seed=3)
    p = torch.tensor([100], device=DEV)
    want, _ = attend(q, cache, p, 256, None)
    cache[:, :, 101:] = float("nan")  # past the position: never read
    got, _ = attend(q, cache, p, 256, None)
    assert torch.equal(got, want)
    cache[:, :, :60] = float("nan")  # before a 41-key window: never read
    got, _ = attend(q, cache, p, 256, 41)
    assert not got.isnan().any()


@pytest.mark.parametrize("per,int_x", [(8, True), (16, True), (8, False)])
def test_attend_writes_the_o_projections_input_format(per, int_x):
    from runtime.kernels.decode_ops import attend
    from runtime.kernels.qgemv import XFormat, permute_x, quantize_x

    q, cache = _case(8, 2, 32, 128, torch.float32, seed=per)
    out, xf = attend(q, cache, torch.tensor([70], device=DEV), 128, None, fmt=XFormat(per, int_x))
    want = quantize_x(out, per) if int_x else permute_x(out, per)
    assert xf.dtype == want.dtype and torch.equal(xf, want)


@pytest.mark.parametrize("keys", [16, 64, 1000, 4096])
def test_splits_are_two_per_sm_and_no_more_than_the_blocks(monkeypatch, keys):
    from runtime.kernels import decode_ops
    from runtime.kernels.decode_ops import ATTEND_BLOCK, attend_splits

    monkeypatch.setattr(decode_ops, "_sm_count", lambda device: 132)
    s = attend_splits(keys, 8, torch.device(DEV))
    assert s == min(33, -(-keys // ATTEND_BLOCK))


@pytest.mark.parametrize("window", [None, 1, 33, 200])
def test_one_call_over_the_whole_cache_is_sdpa_at_every_position(monkeypatch, window):
    """The graph case: `keys` is the whole cache at every step, and the kernels share out the
    keys from the device position alone (every split count from 1 to 33 in use, windows
    starting on and off a block's first key)."""
    from runtime.kernels import decode_ops
    from runtime.kernels.decode_ops import attend

    monkeypatch.setattr(decode_ops, "_sm_count", lambda device: 132)
    ctx = 1100
    q, cache = _case(8, 2, 16, ctx, torch.float32, seed=7)
    for pos in (0, 1, 31, 32, 33, 63, 64, 65, 500, 1055, 1056, 1057, ctx - 1):
        p = torch.tensor([pos], device=DEV)
        out, _ = attend(q, cache, p, ctx, window)
        want = _reference(q, cache, pos, pos + 1, window)
        torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5, msg=f"position {pos}, window {window}")


@pytest.mark.parametrize("heads,kv_heads,d", [(17, 1, 16), (8, 2, 24), (8, 2, 8)])
def test_attend_refuses_what_its_kernels_do_not_take(heads, kv_heads, d):
    from formats.errors import ConfigError
    from runtime.kernels.decode_ops import attend, attend_supported

    q, cache = _case(heads, kv_heads, d, 64, torch.float32, seed=1)
    assert not attend_supported(d, heads // kv_heads)
    with pytest.raises(ConfigError, match="query heads per kv head"):
        attend(q, cache, torch.tensor([3], device=DEV), 64, None)
