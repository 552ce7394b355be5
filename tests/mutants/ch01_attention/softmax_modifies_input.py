"""1.1 inputs_unchanged: subtracts the max in place, overwriting the caller's tensor."""
import torch


def stable_softmax(x, dim=-1):
    x.sub_(x.amax(dim, keepdim=True))
    e = x.exp()
    return e / e.sum(dim, keepdim=True)
