"""2.1 values: positions counted from 1."""
import torch


def sinusoidal_table(max_len, d_model, base=10000.0):
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)
    angle = torch.arange(1, max_len + 1, dtype=torch.float64)[:, None] / base ** (two_i / d_model)
    return torch.stack([angle.sin(), angle.cos()], dim=-1).reshape(max_len, d_model).float()
