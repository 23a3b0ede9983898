"""The sparse MoE block's routing: the model decides which experts each token uses and
with what weight; the expert backend decides where they live and computes them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .experts import ExpertBackend


def route(x: torch.Tensor, router: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, H], router: [E, H] -> (topk_idx [T, k] int64, topk_w [T, k] in x's dtype).

    Mixtral's order: softmax over all E logits in float32, then top-k, then renormalise the
    k probabilities to sum to 1."""
    probs = F.softmax(F.linear(x, router).float(), dim=-1)  # [T, E]
    topk_w, topk_idx = torch.topk(probs, top_k, dim=-1)
    topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
    return topk_idx, topk_w.to(x.dtype)


class MoEBlock(nn.Module):
    def __init__(self, layer: int, router: torch.Tensor, top_k: int):
        super().__init__()
        self.layer, self.top_k = layer, top_k
        self.router = nn.Parameter(router, requires_grad=False)  # [E, H]

    def forward(self, x: torch.Tensor, backend: ExpertBackend) -> torch.Tensor:
        # x: [T, H], the post-attention-normed hidden states
        topk_idx, topk_w = route(x, self.router, self.top_k)
        return backend.forward(self.layer, x, topk_idx, topk_w)
