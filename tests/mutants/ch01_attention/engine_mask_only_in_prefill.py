"""1.5 padded_batch: the mask is applied to the prompt but not when decoding one token ("a single query sees every key")."""
import math

import torch


def engine_attention(q, k, v, mask, is_causal):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if is_causal:
        scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    if mask is not None and q.shape[2] > 1:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v
