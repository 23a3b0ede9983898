"""One expert's FFN, w2(silu(w1 x) * w3 x), straight from its packed record: for a few
tokens two launches (w1 and w3 fused with the gate, then w2), for many tokens dequantize
into a scratch buffer and dense matmuls."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from formats.errors import ConfigError
from formats.header import ExpertLayout

from ..dequant import component_tensors
from .configs import GemvConfig, pick_gemv_config
from .prefill import prefill_matmul
from .qgemv import (PREFILL_THRESHOLD, _check, _sm_count, codes_per_word, gemv, gemv_supported, qmatmul,
                    unpermute_x)


def fused_expert_ffn(record: torch.Tensor, layout: ExpertLayout, x: torch.Tensor, *,
                     prefill_threshold: int = PREFILL_THRESHOLD,
                     configs: dict[str, GemvConfig] | None = None) -> torch.Tensor:
    """x [T, H] (float16/bfloat16/float32, on the record's device) -> [T, H] in x.dtype.

    `configs` may override the GEMV launch of "w13" (the fused gate) and "w2"."""
    if x.dim() != 2:
        raise ConfigError(f"fused_expert_ffn takes x of shape [T, H], got {list(x.shape)}")
    configs = configs or {}
    m1, m3, m2 = layout.matrix("w1"), layout.matrix("w3"), layout.matrix("w2")
    c1, c3, c2 = (component_tensors(record, m.shape, m.spec, base=m.offset) for m in (m1, m3, m2))
    _check(x, c1, m1.shape, m1.spec)
    t = x.shape[0]
    if t > prefill_threshold:
        # intermediate in x.dtype, as runtime.experts.expert_ffn computes it
        h = F.silu(prefill_matmul(x, c1, m1.shape, m1.spec)) * prefill_matmul(x, c3, m3.shape, m3.spec)
        return prefill_matmul(h, c2, m2.shape, m2.spec)
    w2_fused = m2.spec.quantized and gemv_supported(m2.shape, m2.spec)
    cfg2 = configs.get("w2") or pick_gemv_config(*m2.shape, t, m2.spec, sm_count=_sm_count(x.device))
    # the gated kernel can write h in the order w2's kernel reads it: no copy in between
    out_per = codes_per_word(m2.spec) if w2_fused and cfg2.permute_x else 1
    h = None
    if m1.spec == m3.spec and m1.shape == m3.shape and m1.spec.quantized:
        h = gemv(x, [c1, c3], m1.shape, m1.spec, configs.get("w13"), out_per=out_per)  # [T, I], one launch
    if h is None:
        out_per = 1
        h = F.silu(qmatmul(x, c1, m1.shape, m1.spec, prefill_threshold=prefill_threshold)) * qmatmul(
            x, c3, m3.shape, m3.spec, prefill_threshold=prefill_threshold)
    if w2_fused:
        y = gemv(h, [c2], m2.shape, m2.spec, cfg2, x_permuted=out_per > 1)
        if y is not None:
            return y
        if out_per > 1:
            h = unpermute_x(h, out_per)
    return qmatmul(h, c2, m2.shape, m2.spec, prefill_threshold=prefill_threshold)
