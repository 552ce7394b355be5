"""FlashAttention forward in Triton: attention without ever writing the (T, L) score matrix.

Plain attention computes S = Q K^T (T x L), writes it, reads it back for the softmax, writes
P, reads it again for P V: memory traffic grows with T x L. FlashAttention keeps a tile of
queries in registers and streams the keys and values past it in blocks, with the online
softmax (chapter 1): a running max m, a running sum l and an unnormalised output acc,
rescaled by exp(m_old - m_new) whenever the max grows. Only Q, K, V and O cross memory.

Two more ideas make it an inference kernel:
  - grouped-query attention: H query heads share KV key/value heads. A program owns one
    KV head and takes the rows of all its query heads (H / KV of them) times the queries,
    so each key block is loaded once for the whole group, not once per query head;
  - decoding is the case of one query (T = 1) against a long cache: with the group as the
    rows, one program still has H / KV rows of work instead of one.
Queries are the last T of the L positions (a cache holds L - T earlier ones), so the
causal rule is key j <= query i + (L - T); key blocks past a tile's last query are skipped.
Returns the output and the log-sum-exp of each row's scores, what a backward pass (or
combining partial results, as split-K decoding does) needs.
"""

from __future__ import annotations

import math

import torch

from . import load_triton

triton = load_triton()
import triton.language as tl  # noqa: E402


@triton.jit
def flash_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, sm_scale, T, L, group, D,
                           sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, slb, slh,
                           CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b, kvh = tl.program_id(1), tl.program_id(2)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # row r: query head kvh*group + r // T, query r % T
    head = kvh * group + rows // T
    t = rows % T
    row_ok = rows < group * T
    d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * sqb + head[:, None] * sqh + t[:, None] * sqt + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    offset = L - T  # query t sits at position t + offset
    hi = L
    if CAUSAL:
        hi = tl.minimum(L, tl.max(tl.where(row_ok, t, 0), axis=0) + offset + 1)  # later keys: no query here sees them
    cols0 = tl.arange(0, BLOCK_N)
    for n0 in range(0, hi, BLOCK_N):
        cols = n0 + cols0
        k = tl.load(k_ptr + b * skb + kvh * skh + cols[None, :] * skt + d[:, None],
                    mask=(cols[None, :] < L) & (d[:, None] < D), other=0.0)  # (BLOCK_D, BLOCK_N): K^T's tile
        s = tl.dot(q, k) * sm_scale  # (BLOCK_M, BLOCK_N)
        seen = cols[None, :] < L
        if CAUSAL:
            seen = seen & (cols[None, :] <= t[:, None] + offset)
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)  # rescales what was summed under the old max
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + b * svb + kvh * svh + cols[:, None] * svt + d[None, :],
                    mask=(cols[:, None] < L) & (d[None, :] < D), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * sob + head[:, None] * soh + t[:, None] * sot + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (d[None, :] < D))
    tl.store(lse_ptr + b * slb + head * slh + t, m_i + tl.log(l_i), mask=row_ok)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    block_m: int = 64, block_n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, T, D); k, v (B, KV, L, D) with L >= T and H a multiple of KV; the queries
    are the last T of the L positions. Returns out (B, H, T, D) in q's dtype and the
    log-sum-exp of the scaled scores, float32 (B, H, T). The last axis must be contiguous."""
    B, H, T, D = q.shape
    KV, L = k.shape[1], k.shape[2]
    if H % KV or L < T or v.shape != k.shape:
        raise ValueError(f"flash_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need H a "
                         "multiple of KV, as many keys as queries or more, and v shaped like k")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    group = H // KV
    grid = (triton.cdiv(group * T, block_m), B, KV)
    flash_attention_kernel[grid](q, k, v, out, lse, 1.0 / math.sqrt(D), T, L, group, D,
                                 *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                                 *lse.stride()[:2], CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n,
                                 BLOCK_D=max(16, triton.next_power_of_2(D)))
    return out, lse
