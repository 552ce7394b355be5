"""Every attention variant the course teaches, building blocks first.

    attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + mask) V

  - `stable_softmax`: the softmax that cannot overflow;
  - masks: `causal_mask` (any q_len, kv_len) and `padding_mask`;
  - `sdpa_math`: the formula, spelled out, with boolean masks;
  - `repeat_kv`: how grouped-query attention shares one K/V head among several query heads;
  - `multi_head_attention`: from projection weights, for MHA, MQA and GQA alike;
  - `cross_attention`: queries from one sequence, keys and values from another;
  - `tiled_attention`: the FlashAttention forward recurrence (online softmax over tiles,
    causal tiles above the diagonal skipped), never holding the T x T score matrix,
    returning the log-sum-exp as well;
  - `attention`: the fast path the model runs (PyTorch's fused kernel).

`ATTENTION_IMPLS` maps the names accepted by `ModelConfig.attn_impl` to functions with
one signature, so the model can run any of them and give the same logits.
Shapes: q (B, H, Tq, D); k, v (B, KV, Tk, D) with H a multiple of KV; masks broadcast to
(B, H, Tq, Tk) and are either bool (True = may attend) or float, added to the scores
(-inf hides a key; ALiBi's distance penalty travels this way, see `positional.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def stable_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """softmax(x)_i = exp(x_i - max x) / sum_j exp(x_j - max x); rows that are all -inf give 0."""
    peak = x.amax(dim, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # fully masked rows
    e = (x - peak).exp()
    total = e.sum(dim, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


# -- masks --------------------------------------------------------------------------------


def causal_mask(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """bool (q_len, kv_len): query i sees keys 0 .. i + (kv_len - q_len).

    The queries are the *last* q_len positions of the kv_len-long sequence, which is what
    decoding with a KV cache means. Example: q_len=2, kv_len=4 ->
        [[1, 1, 1, 0],
         [1, 1, 1, 1]]
    """
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=kv_len - q_len)


def padding_mask(key_valid: torch.Tensor) -> torch.Tensor:
    """(B, Tk) bool, True on real tokens -> (B, 1, 1, Tk), broadcastable over heads and queries."""
    return key_valid[:, None, None, :]


def apply_mask(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scores with a bool mask (False -> -inf) or a float mask (added) applied."""
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask


# -- the formula ------------------------------------------------------------------------------


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, KV, T, D) -> (B, KV * n_rep, T, D), each K/V head repeated for its query group.

    subtle: query head h belongs to K/V head h // n_rep, so heads repeat as 0,0,0,1,1,1
    (repeat_interleave), not 0,1,0,1 (repeat): the wrong order still runs and is wrong.
    """
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def sdpa_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              is_causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) masked) v, with K/V heads repeated for grouped queries.
    Materialises the (Tq, Tk) score matrix of every head. Returns (B, H, Tq, D)."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    if is_causal:
        scores = apply_mask(scores, causal_mask(q.shape[2], k.shape[2], q.device))
    if mask is not None:
        scores = apply_mask(scores, mask)
    return stable_softmax(scores, dim=-1) @ v


# -- from projection weights --------------------------------------------------------------


def multi_head_attention(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, wo: torch.Tensor,
                         n_heads: int, n_kv_heads: int, mask: torch.Tensor | None = None,
                         is_causal: bool = True) -> torch.Tensor:
    """Self-attention of x (B, T, d_model) with weights in nn.Linear layout (out, in).

    n_kv_heads == n_heads: multi-head (MHA); == 1: multi-query (MQA); in between:
    grouped-query (GQA). wq: (n_heads * D, d_model), wk and wv: (n_kv_heads * D, d_model),
    wo: (d_model, n_heads * D). Returns (B, T, d_model).
    """
    B, T, _ = x.shape
    D = wq.shape[0] // n_heads
    q = (x @ wq.T).view(B, T, n_heads, D).transpose(1, 2)  # (B, H, T, D)
    k = (x @ wk.T).view(B, T, n_kv_heads, D).transpose(1, 2)  # (B, KV, T, D)
    v = (x @ wv.T).view(B, T, n_kv_heads, D).transpose(1, 2)  # (B, KV, T, D)
    y = sdpa_math(q, k, v, mask, is_causal)  # (B, H, T, D)
    return y.transpose(1, 2).reshape(B, T, n_heads * D) @ wo.T


def cross_attention(x: torch.Tensor, memory: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor,
                    wo: torch.Tensor, n_heads: int, memory_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Encoder-decoder attention: queries from the decoder states x (B, Tq, d_model), keys
    and values from the encoder output memory (B, Tk, d_model). No causal mask: every
    decoder position may read the whole source; memory_valid (B, Tk) masks its padding."""
    B, Tq, _ = x.shape
    Tk = memory.shape[1]
    D = wq.shape[0] // n_heads
    q = (x @ wq.T).view(B, Tq, n_heads, D).transpose(1, 2)  # (B, H, Tq, D)
    k = (memory @ wk.T).view(B, Tk, n_heads, D).transpose(1, 2)  # (B, H, Tk, D)
    v = (memory @ wv.T).view(B, Tk, n_heads, D).transpose(1, 2)
    mask = None if memory_valid is None else padding_mask(memory_valid)
    y = sdpa_math(q, k, v, mask)  # (B, H, Tq, D)
    return y.transpose(1, 2).reshape(B, Tq, n_heads * D) @ wo.T


# -- online softmax -----------------------------------------------------------------------


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                    is_causal: bool = False, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention in (query block, key block) tiles with an online softmax: the FlashAttention
    forward pass.

    For each block of queries, walk the key blocks keeping, per query, a running max m,
    denominator l and output acc:
        s     = q_blk k_blk^T / sqrt(D)           scores for this tile only
        m_new = max(m, rowmax(s))
        p     = exp(s - m_new)
        l     = l * exp(m - m_new) + rowsum(p)    old terms rescaled to the new max
        acc   = acc * exp(m - m_new) + p v_blk
    then out = acc / l and lse = m + log(l). With is_causal, a query block stops at the
    key block holding its last position: the tiles above the diagonal, half the work, are
    never computed. Extra memory is one (block, block) tile per head instead of (Tq, Tk).
    Rows with no visible key give out = 0 and lse = -inf.
    Returns (out (B, H, Tq, D), lse (B, H, Tq)).
    """
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    n_rep = H // k.shape[1]
    scale = 1.0 / math.sqrt(D)
    offset = Tk - Tq  # queries are the last Tq positions
    outs, lses = [], []
    for qs in range(0, Tq, block_size):
        qe = min(qs + block_size, Tq)
        q_blk = q[:, :, qs:qe]  # (B, H, bq, D)
        q_pos = torch.arange(qs, qe, device=q.device)[:, None] + offset  # (bq, 1)
        m = torch.full((B, H, qe - qs, 1), float("-inf"), dtype=q.dtype, device=q.device)
        l = torch.zeros(B, H, qe - qs, 1, dtype=q.dtype, device=q.device)
        acc = torch.zeros(B, H, qe - qs, D, dtype=q.dtype, device=q.device)
        key_end = min(Tk, qe + offset) if is_causal else Tk  # causal: skip tiles above the diagonal
        for ks in range(0, key_end, block_size):
            ke = min(ks + block_size, key_end)
            s = (q_blk @ repeat_kv(k[:, :, ks:ke], n_rep).transpose(-2, -1)) * scale  # (B, H, bq, bk)
            if is_causal and ke - 1 > qs + offset:  # only tiles that cross the diagonal need a mask
                s = apply_mask(s, torch.arange(ks, ke, device=q.device)[None, :] <= q_pos)  # (bq, bk)
            if mask is not None:
                s = apply_mask(s, mask[..., qs:qe, ks:ke] if mask.shape[-2] > 1 else mask[..., ks:ke])
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))  # no key seen yet
            p = (s - safe).exp()
            rescale = (m - safe).exp()  # exp(-inf) = 0 before the first visible key
            l = l * rescale + p.sum(-1, keepdim=True)
            acc = acc * rescale + p @ repeat_kv(v[:, :, ks:ke], n_rep)
            m = m_new
        outs.append(acc / torch.where(l > 0, l, torch.ones_like(l)))
        lses.append((m + l.log()).squeeze(-1))  # -inf where nothing was visible
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


# -- what the model runs ------------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """The fast path: PyTorch's fused kernel. is_causal (only with mask None) assumes the
    queries and keys start at the same position (Tq == Tk). Returns (B, H, T, D)."""
    B, H, T, D = q.shape
    n_kv = k.shape[1]
    group = H // n_kv
    if T == 1:
        # Decode step: one query per head. Query heads g*group .. g*group+group-1 share
        # K/V head g, so fold the group into the query-length axis and attend once per
        # K/V head: (B, KV, group, D) against (B, KV, L, D). No repeated K/V in memory.
        if mask is not None and mask.shape[1] == H and H > 1:  # per-head mask (ALiBi): fold it too
            mask = mask.reshape(mask.shape[0], n_kv, group, mask.shape[-1])  # (B, KV, group, L)
        out = F.scaled_dot_product_attention(q.view(B, n_kv, group, D), k, v, attn_mask=mask)
        return out.view(B, H, 1, D)
    k, v = repeat_kv(k, group), repeat_kv(v, group)  # (B, H, L, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)


ATTENTION_IMPLS = {
    "sdpa": attention,
    "math": sdpa_math,
    "tiled": lambda q, k, v, mask, is_causal: tiled_attention(q, k, v, mask, is_causal)[0],
}
