"""2.2 relative: angles laid out for adjacent pairs (a0, a0, a1, a1, ...) but rotate_half pairing."""
import torch


def apply_rope(x, positions, base=10000.0):
    D = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = (positions.double()[..., None, None] * inv_freq).repeat_interleave(2, dim=-1)  # (B, T, 1, D)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
