"""2.2 values: adjacent pairs (x0, x1), (x2, x3) rotated instead of the half-split pairs."""
import torch


def apply_rope(x, positions, base=10000.0):
    D = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = positions.double()[..., None, None] * inv_freq  # (B, T, 1, D/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
