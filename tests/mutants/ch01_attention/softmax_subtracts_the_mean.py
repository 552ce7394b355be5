"""1.1 large_inputs: the mean is no bound on the largest exponent."""
import torch


def stable_softmax(x, dim=-1):
    e = (x - x.mean(dim, keepdim=True)).exp()
    return e / e.sum(dim, keepdim=True)
