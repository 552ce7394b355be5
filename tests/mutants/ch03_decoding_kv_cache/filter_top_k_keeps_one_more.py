"""3.1 top_k: cuts at the (k+1)-th largest logit instead of the k-th, so it keeps one token too many."""
import torch


def filter_logits(logits, top_k, top_p):
    if 0 < top_k < logits.shape[-1]:
        values = torch.topk(logits, min(top_k + 1, logits.shape[-1]), dim=-1).values
        logits = logits.masked_fill(logits < values[..., -1:], float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits
