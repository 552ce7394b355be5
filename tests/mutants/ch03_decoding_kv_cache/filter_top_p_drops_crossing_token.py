"""3.1 top_p: keeps tokens while the running mass (their own included) stays within top_p, which drops the token that crosses it, and with a small top_p every token."""
import torch


def filter_logits(logits, top_k, top_p):
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) > top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits
