"""2.1 long_positions: angles computed in float32, fine for short tables only."""
import torch


def sinusoidal_table(max_len, d_model, base=10000.0):
    two_i = torch.arange(0, d_model, 2, dtype=torch.float32)
    angle = torch.arange(max_len, dtype=torch.float32)[:, None] / base ** (two_i / d_model)
    return torch.stack([angle.sin(), angle.cos()], dim=-1).reshape(max_len, d_model)
