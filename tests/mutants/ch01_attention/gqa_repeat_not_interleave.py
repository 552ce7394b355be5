"""1.3 gqa: K/V heads repeated 0,1,0,1 instead of 0,0,1,1."""
import math

import torch


def grouped_query_attention(x, wq, wk, wv, wo, n_heads, n_kv_heads):
    B, T, _ = x.shape
    D = wq.shape[0] // n_heads
    q = (x @ wq.T).view(B, T, n_heads, D).transpose(1, 2)
    k = (x @ wk.T).view(B, T, n_kv_heads, D).transpose(1, 2)
    v = (x @ wv.T).view(B, T, n_kv_heads, D).transpose(1, 2)
    group = n_heads // n_kv_heads
    k, v = k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float('-inf'))
    y = scores.softmax(-1) @ v
    return y.transpose(1, 2).reshape(B, T, n_heads * D) @ wo.T
