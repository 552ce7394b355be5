"""2.2 relative: x * cos + x * sin, the rotate_half term forgotten: a scaling, not a rotation."""
import torch


def apply_rope(x, positions, base=10000.0):
    D = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = torch.cat([inv_freq, inv_freq]) * positions.double()[..., None, None]  # (B, T, 1, D)
    return x * angle.cos().to(x.dtype) + x * angle.sin().to(x.dtype)
