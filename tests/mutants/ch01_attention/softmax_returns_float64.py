"""1.1 output_type: float32 in must give float32 out."""
import torch


def stable_softmax(x, dim=-1):
    x = x.double()
    e = (x - x.amax(dim, keepdim=True)).exp()
    return e / e.sum(dim, keepdim=True)
