"""3.1 top_k: takes the k largest logits of the whole batch instead of each row's."""
import torch


def filter_logits(logits, top_k, top_p):
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits.flatten(), top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits
