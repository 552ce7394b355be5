"""1.2 causal: each query also sees the next key."""
import math

import torch


def scaled_dot_product_attention(q, k, v, key_valid=None, causal=False):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    Tq, Tk = scores.shape[-2:]
    visible = torch.ones(Tq, Tk, dtype=torch.bool)
    if causal:
        visible = visible.tril(diagonal=Tk - Tq + 1)
    if key_valid is not None:
        visible = visible & key_valid[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    peak = scores.amax(-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    e = (scores - peak).exp()
    total = e.sum(-1, keepdim=True)
    return torch.where(total > 0, e / total, torch.zeros_like(e)) @ v
