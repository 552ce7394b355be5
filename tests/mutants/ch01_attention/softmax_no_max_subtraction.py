"""1.1 large_inputs: exp() of raw scores overflows float32 above about 88."""
import torch


def stable_softmax(x, dim=-1):
    e = x.exp()
    return e / e.sum(dim, keepdim=True)
