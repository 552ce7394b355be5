"""Tensor parallel inference (Megatron-LM's split), on the engine's own modules.

A linear layer y = x W^T can be split two ways over p ranks:
  - by columns of the output (rows of W): each rank computes its slice of y from the
    whole x, with no communication ("column parallel");
  - by rows of the input (columns of W): each rank multiplies its slice of x by its
    slice of W and gets a partial sum of the whole y; an all-reduce adds them ("row
    parallel"). A bias is added once, after the sum.
Column then row is the pair that needs nothing in between: attention's Q/K/V are split
by heads (column), each rank attends with its own heads, and the output projection is
split by the same heads (row): one all-reduce per attention. The MLP's gate and up are
split by columns, SiLU(gate) * up is element-wise and stays local, down is split by rows:
one all-reduce per MLP. Two all-reduces of d_model numbers per token per block.

Grouped-query attention adds one rule: a query head needs its K/V head on the same rank,
so heads are split by KV group. SmolLM2 has 3 KV groups of 3 query heads: 3 ranks get a
group each; 2 ranks get 2 groups and 1 (uneven, 6 and 3 query heads). 4 ranks would need
a KV head copied onto two ranks (each computing it again); this engine refuses that.
The LM head is split by vocabulary rows; the logits are gathered. The embedding stays
whole on every rank (a lookup of a few rows; splitting it costs another all-reduce).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..errors import DojoError
from ..model import Linear, Transformer
from .comm import Comm


def split_sizes(n: int, parts: int) -> list[int]:
    """n items in `parts` contiguous shares, the first ones one larger. Example: 10, 3 -> [4, 3, 3]."""
    base, extra = divmod(n, parts)
    return [base + (i < extra) for i in range(parts)]


def shares(n: int, parts: int) -> list[range]:
    """range(n) cut by `split_sizes`, in order: what each rank (stage, micro-batch) takes.
    Example: 10, 3 -> [range(0, 4), range(4, 7), range(7, 10)]."""
    starts = [0]
    for size in split_sizes(n, parts):
        starts.append(starts[-1] + size)
    return [range(a, b) for a, b in zip(starts, starts[1:])]


def kv_group_split(n_heads: int, n_kv_heads: int, world: int) -> list[tuple[range, range]]:
    """(query heads, KV heads) of each rank, split by KV group.
    Example: 9 heads, 3 KV heads, 2 ranks -> [(range(0, 6), range(0, 2)), (range(6, 9), range(2, 3))]."""
    if not 1 <= world <= n_kv_heads:
        raise DojoError(f"tensor parallel splits attention by KV group, and this model has {n_kv_heads} KV "
                        f"heads: use 1 to {n_kv_heads} ranks, not {world} (pipeline or data parallel take more)")
    group = n_heads // n_kv_heads
    return [(range(kv.start * group, kv.stop * group), kv) for kv in shares(n_kv_heads, world)]


class RowParallelLinear(nn.Module):
    """This rank's columns of W (its slice of the input features), then the all-reduce that
    sums every rank's partial product; the bias once, after the sum."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, comm: Comm):
        super().__init__()
        self.local = Linear(weight.shape[1], weight.shape[0], bias=False)
        self.local.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.comm.all_reduce(self.local(x))
        return y if self.bias is None else y + self.bias


class VocabParallelHead(nn.Module):
    """Logits for this rank's rows of the vocabulary, gathered into the whole vocabulary."""

    def __init__(self, weight: torch.Tensor, sizes: list[int], comm: Comm):
        super().__init__()
        self.local = Linear(weight.shape[1], weight.shape[0], bias=False)
        self.local.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.sizes, self.comm = sizes, comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_gather(self.local(x), self.sizes)  # (B, T, vocab)


def _column(lin: Linear, rows: torch.Tensor) -> Linear:
    """A Linear keeping only the given output rows of lin."""
    out = Linear(lin.in_features, len(rows), bias=lin.bias is not None)
    out.weight = nn.Parameter(lin.weight.detach()[rows].contiguous(), requires_grad=False)
    if lin.bias is not None:
        out.bias = nn.Parameter(lin.bias.detach()[rows].clone(), requires_grad=False)
    return out


def shard_model(model: Transformer, comm: Comm) -> Transformer:
    """Keep this rank's share of every block and of the LM head, in place; the config then
    describes the local shard (its heads and FFN width). Greedy tokens stay those of the
    whole model; logits differ by float32 rounding (partial sums added in another order)."""
    c, rank, world = model.config, comm.rank, comm.world
    if c.norm != "rmsnorm" or c.pos_encoding != "rope" or c.mlp != "swiglu":
        raise DojoError("tensor parallel is built for the Llama family (RMSNorm, RoPE, SwiGLU)")
    heads, kv_heads = kv_group_split(c.n_heads, c.n_kv_heads, world)[rank]
    ffn = shares(c.ffn_dim, world)[rank]
    ffn_rows = torch.arange(ffn.start, ffn.stop)
    D = c.head_dim
    q_rows = torch.arange(heads.start * D, heads.stop * D)
    k_rows = c.n_heads * D + torch.arange(kv_heads.start * D, kv_heads.stop * D)
    v_rows = k_rows + c.n_kv_heads * D
    for layer in model.layers:
        attn, mlp = layer.attn, layer.mlp
        attn.wqkv = _column(attn.wqkv, torch.cat([q_rows, k_rows, v_rows]))  # rows [Q; K; V] of this rank's heads
        attn.wo = RowParallelLinear(attn.wo.weight.detach()[:, q_rows], attn.wo.bias, comm)
        attn.n_heads, attn.n_kv_heads = len(heads), len(kv_heads)
        mlp.w13 = _column(mlp.w13, torch.cat([ffn_rows, c.ffn_dim + ffn_rows]))  # rows [gate; up]
        mlp.w2 = RowParallelLinear(mlp.w2.weight.detach()[:, ffn_rows], mlp.w2.bias, comm)
    vocab = shares(c.vocab_size, world)
    head = model.lm_head.weight if "lm_head" in model._modules else model.tok_embeddings.weight
    model.lm_head = VocabParallelHead(head.detach()[vocab[rank].start:vocab[rank].stop], [len(v) for v in vocab], comm)
    model.tied_head_packed = None
    model.config = replace(c, n_heads=len(heads), n_kv_heads=len(kv_heads), ffn_dim=len(ffn))
    model.pack_for_cpu()  # packed copies of the shards (the whole model's are dropped with it)
    return model


def local_bytes(model: Transformer) -> int:
    """Bytes of this rank's weights (packed copies not counted)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
