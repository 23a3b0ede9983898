"""One token's split-key attention over the KV cache (kernels.decode_ops.attend) against
torch's scaled_dot_product_attention with the mask runtime.attention builds: under the Triton
interpreter on the CPU, compiled on CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.attention import attention_mask

from .interpreter import CUDA, interpreted_kernels, use_interpreter

interpreted_kernels()
DEV = "cuda" if CUDA else "cpu"
pytestmark = [pytest.mark.cuda] if CUDA else []
DTYPES = [torch.float32] + ([torch.float16, torch.bfloat16] if CUDA else [])


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    use_interpreter(monkeypatch)


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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,d,ctx,keys,pos,window", [
    (8, 2, 16, 64, 64, 0, None),  # the first token: one key
    (8, 2, 16, 64, 64, 63, None),  # every key
    (4, 4, 32, 300, 256, 130, None),  # no grouping; keys past pos in the bucket unseen
    (32, 8, 128, 1024, 1024, 577, None),  # Mixtral's heads at the #6 benchmark's depth
    (12, 2, 16, 200, 200, 150, 40),  # a sliding window: keys 111..150
    (6, 3, 64, 96, 96, 20, 64),  # a window longer than the position
    (16, 1, 16, 2048, 2048, 1999, None),  # one kv head, 16 query heads: tl.dot's rows exactly
])
def test_attend_is_sdpa_over_what_the_token_sees(dtype, heads, kv_heads, d, ctx, keys, pos, window):
    from runtime.kernels.decode_ops import attend

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
def test_splits_cover_the_keys_in_whole_blocks(keys):
    from runtime.kernels.decode_ops import ATTEND_BLOCK, attend_splits

    kps, s = attend_splits(keys, 8, torch.device(DEV))
    assert kps % ATTEND_BLOCK == 0 and (s - 1) * kps < keys <= s * kps
