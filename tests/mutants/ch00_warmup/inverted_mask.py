"""0.2 values: keeps the masked-out entries and drops the kept ones."""
import torch


def masked_softmax(scores, mask, dim=-1):
    s = scores.masked_fill(mask, float("-inf"))
    e = (s - s.amax(dim, keepdim=True)).exp()
    return e / e.sum(dim, keepdim=True)
