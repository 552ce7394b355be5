"""0.2 fully_masked_rows: -inf everywhere gives nan, which then spreads."""
import torch


def masked_softmax(scores, mask, dim=-1):
    s = scores.masked_fill(~mask, float("-inf"))
    e = (s - s.amax(dim, keepdim=True)).exp()
    return e / e.sum(dim, keepdim=True)
