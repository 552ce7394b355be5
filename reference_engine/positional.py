"""Positional encodings: rotary (RoPE) and learned absolute positions.

RoPE rotates each pair of query/key features by an angle proportional to the token's
position, so the score q_m . k_n depends only on the offset m - n. This module uses the
*half-split* layout (feature i is paired with feature i + head_dim/2, as in HF
transformers); `gguf_loader.py` converts the GGUF file's adjacent-pair layout into it.
"""

from __future__ import annotations

import torch


def rope_tables(head_dim: int, max_seq_len: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of angle[p, i] = p * base^(-2i / head_dim), shape (max_seq_len, head_dim).

    Each of the head_dim/2 frequencies appears twice (once per half), matching `rotate_half`.
    Computed in float64 so that positions near 8192 keep full float32 accuracy.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (D/2,)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (S, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (S, D)
    return angles.cos().float(), angles.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (B, T, H, D) with cos/sin of shape (B, T, 1, D) (already gathered
    at each token's position): x * cos + rotate_half(x) * sin."""
    return x * cos + rotate_half(x) * sin
