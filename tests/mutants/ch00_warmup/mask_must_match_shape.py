"""0.2 broadcast_mask: reshapes the mask to the scores' shape instead of broadcasting it."""
import torch


def masked_softmax(scores, mask, dim=-1):
    mask = mask.reshape(scores.shape)
    s = scores.masked_fill(~mask, float("-inf"))
    peak = s.amax(dim, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    e = (s - peak).exp()
    total = e.sum(dim, keepdim=True)
    return torch.where(total > 0, e / total, torch.zeros_like(e))
