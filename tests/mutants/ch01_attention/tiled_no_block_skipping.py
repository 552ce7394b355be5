"""1.4 speed: correct, but computes the causal tiles above the diagonal too."""
import math

import torch


def tiled_attention(q, k, v, causal=False, block_size=64):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    offset = Tk - Tq
    outs, lses = [], []
    for qs in range(0, Tq, block_size):
        qe = min(qs + block_size, Tq)
        q_pos = torch.arange(qs, qe)[:, None] + offset
        m = torch.full((B, H, qe - qs, 1), float("-inf"), dtype=q.dtype)
        l = torch.zeros(B, H, qe - qs, 1, dtype=q.dtype)
        acc = torch.zeros(B, H, qe - qs, D, dtype=q.dtype)
        key_end = Tk
        for ks in range(0, key_end, block_size):
            ke = min(ks + block_size, key_end)
            s = q[:, :, qs:qe] @ k[:, :, ks:ke].transpose(-2, -1) / math.sqrt(D)
            if causal:
                s = s.masked_fill(torch.arange(ks, ke)[None, :] > q_pos, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            p = (s - m_new).exp()
            rescale = (m - m_new).exp()
            l = l * rescale + p.sum(-1, keepdim=True)
            acc = acc * rescale + p @ v[:, :, ks:ke]
            m = m_new
        outs.append(acc / l)
        lses.append((m + l.log()).squeeze(-1))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
