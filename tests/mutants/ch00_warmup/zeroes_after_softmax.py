"""0.2 values: zeroing probabilities after the softmax leaves rows that do not sum to 1."""
import torch


def masked_softmax(scores, mask, dim=-1):
    e = (scores - scores.amax(dim, keepdim=True)).exp()
    return e / e.sum(dim, keepdim=True) * mask
