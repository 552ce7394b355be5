"""1.5 padded_batch: masked keys are zeroed after the softmax, so the rest no longer sums to one."""
import math

import torch


def engine_attention(q, k, v, mask, is_causal):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if is_causal:
        scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    probs = scores.softmax(-1)
    if mask is not None:
        probs = probs * mask
    return probs @ v
