"""2.1 values: all the sines first, then all the cosines."""
import torch


def sinusoidal_table(max_len, d_model, base=10000.0):
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)
    angle = torch.arange(max_len, dtype=torch.float64)[:, None] / base ** (two_i / d_model)
    return torch.cat([angle.sin(), angle.cos()], dim=-1).float()
