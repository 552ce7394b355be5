"""2.1 values: i read as the feature index, so the exponent is 2i/d for every feature i."""
import torch


def sinusoidal_table(max_len, d_model, base=10000.0):
    i = torch.arange(d_model, dtype=torch.float64)
    angle = torch.arange(max_len, dtype=torch.float64)[:, None] / base ** (2 * i / d_model)  # (max_len, d)
    table = angle.sin()
    table[:, 1::2] = angle[:, 1::2].cos()
    return table.float()
