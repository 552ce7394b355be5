"""1.2 every check: the task is to write attention, not to call it."""
import torch


def scaled_dot_product_attention(q, k, v, key_valid=None, causal=False):
    mask = None if key_valid is None else key_valid[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
