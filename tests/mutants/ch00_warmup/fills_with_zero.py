"""0.2 values: a score of 0 still gets probability; masked entries need -inf."""
import torch


def masked_softmax(scores, mask, dim=-1):
    s = scores.masked_fill(~mask, 0.0)
    e = (s - s.amax(dim, keepdim=True)).exp()
    return e / e.sum(dim, keepdim=True)
