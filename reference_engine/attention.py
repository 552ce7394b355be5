"""Scaled dot-product attention: the readable formula and the fast path the model uses.

    attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + mask) V

`attention_reference` spells the formula out; `attention` is what the model runs: it
calls PyTorch's fused kernel and handles grouped-query attention without copying K/V.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """q: (B, H, Tq, D), k and v: (B, H, Tk, D), mask: bool, True = may attend,
    broadcastable to (B, H, Tq, Tk). Returns (B, H, Tq, D)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """Grouped-query attention. q: (B, H, T, D); k, v: (B, KV, L, D) with H a multiple of KV.

    mask: bool (B, 1, T, L), True = may attend, or None. is_causal (only with mask None)
    means query i sees keys 0..i. Returns (B, H, T, D).
    """
    B, H, T, D = q.shape
    n_kv = k.shape[1]
    group = H // n_kv
    if T == 1:
        # Decode step: one query per head. Query heads g*group .. g*group+group-1 share
        # K/V head g, so fold the group into the query-length axis and attend once per
        # K/V head: (B, KV, group, D) against (B, KV, L, D). No repeated K/V in memory.
        out = F.scaled_dot_product_attention(q.view(B, n_kv, group, D), k, v, attn_mask=mask)
        return out.view(B, H, 1, D)
    if group > 1:
        # subtle: repeat_interleave (0,0,0,1,1,1,...) not repeat (0,1,0,1,...): query head h
        # reads K/V head h // group.
        k = k.repeat_interleave(group, dim=1)  # (B, H, L, D)
        v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
