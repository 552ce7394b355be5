"""2.4 any_heads: 2^(-8(h+1)/n) used for every head count, not only powers of two."""
import torch


def alibi_bias(n_heads, q_len, kv_len):
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / n_heads) for h in range(n_heads)])
    q_pos = torch.arange(kv_len - q_len, kv_len)[:, None]
    distance = (q_pos - torch.arange(kv_len)[None, :]).float()
    bias = -slopes[:, None, None] * distance
    return bias.masked_fill(distance < 0, float("-inf"))
