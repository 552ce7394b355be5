"""2.2 positions: positions taken as 0 .. T-1 whatever the positions argument says."""
import torch


def apply_rope(x, positions, base=10000.0):
    D = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = torch.arange(x.shape[1], dtype=torch.float64)[:, None, None] * inv_freq  # (T, 1, D/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
