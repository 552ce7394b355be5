"""2.4 values: the distance added instead of subtracted, rewarding far keys."""
import math

import torch


def alibi_bias(n_heads, q_len, kv_len):
    m = 2 ** int(math.log2(n_heads))
    slopes = [2.0 ** (-8.0 * (h + 1) / m) for h in range(m)]
    slopes += [2.0 ** (-8.0 * (h + 1) / (2 * m)) for h in range(0, 2 * m, 2)][: n_heads - m]
    q_pos = torch.arange(kv_len - q_len, kv_len)[:, None]
    distance = (q_pos - torch.arange(kv_len)[None, :]).float()
    bias = torch.tensor(slopes)[:, None, None] * distance
    return bias.masked_fill(distance < 0, float("-inf"))
