"""Fused dequantize-matmul kernels (Triton) for the packed 2/3/4/8-bit layouts: the GPU
decode path. Importing this package does not import triton; the kernels load on first use.

    use_fused(x)                                   -> whether to take this path
    qmatmul(x, comps, shape, spec)                 -> x @ W.T of one packed matrix
    fused_expert_ffn(record, layout, x)            -> w2(silu(w1 x) * w3 x) of one record
    indexed_expert_ffn(records, sel, w, layout, x) -> sum_e w[e] * FFN of records[sel[e]] (device-chosen)
    grouped_expert_ffn(records, row0, offsets, xs, layout, max_rows) -> a layer's experts over a prompt (fused GEMM)
    grouped_prompt_ffn(records, row0, counts, offsets, xs, layout, chunk) -> the same, dequantized a few per launch
    dequantize_into(comps, shape, spec, out)       -> W written densely (prefill path)
"""

from .configs import GemvConfig, pick_gemv_config, register_config
from .dispatch import interpreting, triton_available, use_fused
from .expert import (fused_expert_ffn, grouped_expert_ffn, grouped_prompt_ffn, indexed_expert_ffn, indexed_input_format,
                     indexed_supported, prompt_chunk)
from .prefill import dequantize_into, dequantize_triton, release_scratch
from .qgemv import PREFILL_THRESHOLD, gemv_supported, qmatmul

__all__ = [
    "GemvConfig",
    "PREFILL_THRESHOLD",
    "dequantize_into",
    "dequantize_triton",
    "fused_expert_ffn",
    "grouped_expert_ffn",
    "grouped_prompt_ffn",
    "indexed_expert_ffn",
    "indexed_input_format",
    "indexed_supported",
    "gemv_supported",
    "interpreting",
    "pick_gemv_config",
    "prompt_chunk",
    "qmatmul",
    "register_config",
    "release_scratch",
    "triton_available",
    "use_fused",
]
