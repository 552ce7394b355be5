"""0.2 large_inputs: masks correctly but exponentiates raw scores."""
import torch


def masked_softmax(scores, mask, dim=-1):
    e = scores.exp() * mask
    total = e.sum(dim, keepdim=True)
    return torch.where(total > 0, e / total, torch.zeros_like(e))
