"""Structured pruning: remove whole rows and columns, so the model itself gets smaller.

Unstructured zeros leave every matrix its shape; removing structure shrinks the shapes,
and a smaller dense matmul is faster on any hardware. Three units, each scored on
calibration text, the lowest-scored removed, and a real smaller `Transformer` built (new
config, smaller weights; it loads, generates, batches and decodes through the compiled
path like any other):

  FFN channels  channel j of a SwiGLU MLP is row j of gate, row j of up and column j of
                down: all three go together. Score: ||down[:, j]|| * ||h_j|| (h = silu(gate)
                * up over calibration tokens, Wanda's idea for a whole channel).
  KV groups     with grouped-query attention a K/V head serves `group` query heads; removing
                a query head alone would leave the grouping inconsistent, so a whole group
                goes: its K and V rows, its query heads' Q rows and their columns of wo.
                Score: the squared Wanda scores of the group's wo columns, summed.
  blocks        a block whose output is nearly its input does little: score 1 - the mean
                cosine similarity of its input and output (depth pruning, ShortGPT-style).

Every layer keeps the same number of channels and groups (the config has one ffn_dim, one
n_heads, one n_kv_heads).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import DojoError


def _rebuild(model, config, state: dict[str, torch.Tensor]):
    from ..load import model_from_state_dict

    new = model_from_state_dict(config, {k: v.detach().clone().contiguous() for k, v in state.items()})
    new = new.to(model.tok_embeddings.weight.dtype).eval().requires_grad_(False)
    if any(getattr(m, "packed", None) is not None for m in model.modules()):
        new.pack_for_cpu()
    return new


def _check_llama(model, what: str) -> None:
    c = model.config
    if (c.mlp, c.bias) != ("swiglu", False) or any(type(m).__name__ == "QuantizedLinear" for m in model.modules()):
        raise DojoError(f"{what} is written for float Llama-family models (SwiGLU, no biases, not quantized): "
                        "prune first, then quantize")


@torch.inference_mode()
def block_io(model, windows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every block for the calibration windows, float32 (B, T, d_model)."""
    from .calibration import block_inputs

    x, rope, mask = block_inputs(model, windows)
    pairs = []
    for layer in model.layers:
        y = layer(x, rope, 0, mask)
        pairs.append((x.float(), y.float()))
        x = y
    return pairs


def ffn_channel_scores(model, norms: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per layer (ffn_dim,): ||down[:, j]|| * ||h_j||; norms from `prune.input_norms`."""
    return [layer.mlp.w2.weight.detach().float().norm(dim=0) * norms[f"layers.{i}.mlp.w2"]
            for i, layer in enumerate(model.layers)]


def prune_ffn_channels(model, keep: int, scores: list[torch.Tensor]):
    """A new model whose MLPs keep the `keep` best-scored channels of each layer."""
    _check_llama(model, "FFN channel pruning")
    c = model.config
    if not 1 <= keep <= c.ffn_dim:
        raise DojoError(f"keep between 1 and {c.ffn_dim} FFN channels; got {keep}")
    state = model.state_dict()
    for i, s in enumerate(scores):
        kept = torch.sort(torch.topk(s, keep).indices).values  # the best channels, in their order
        w13, w2 = state[f"layers.{i}.mlp.w13.weight"], state[f"layers.{i}.mlp.w2.weight"]
        gate, up = w13[: c.ffn_dim], w13[c.ffn_dim:]
        state[f"layers.{i}.mlp.w13.weight"] = torch.cat([gate[kept], up[kept]])  # (2 keep, d_model)
        state[f"layers.{i}.mlp.w2.weight"] = w2[:, kept]  # (d_model, keep)
    return _rebuild(model, replace(c, ffn_dim=keep), state)


def kv_group_scores(model, norms: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per layer (n_kv_heads,): sum over the group's columns of wo of (||wo[:, j]|| ||X_j||)^2."""
    c = model.config
    out = []
    for i, layer in enumerate(model.layers):
        col = layer.attn.wo.weight.detach().float().norm(dim=0) * norms[f"layers.{i}.attn.wo"]  # (H D,)
        out.append((col ** 2).view(c.n_kv_heads, -1).sum(-1))  # a group's heads are consecutive
    return out


def prune_kv_groups(model, remove: int, scores: list[torch.Tensor]):
    """A new model with `remove` fewer KV groups (and their query heads) in every layer."""
    _check_llama(model, "head pruning")
    c = model.config
    group, D = c.n_heads // c.n_kv_heads, c.head_dim
    if not 0 <= remove < c.n_kv_heads:
        raise DojoError(f"each layer has {c.n_kv_heads} KV groups of {group} query heads: remove 0 to "
                        f"{c.n_kv_heads - 1} of them (one must stay); got {remove}")
    state = model.state_dict()
    KV = c.n_kv_heads - remove
    for i, s in enumerate(scores):
        kept = torch.sort(torch.topk(s, KV).indices).values
        heads = (kept[:, None] * group + torch.arange(group)).flatten()  # query heads of the kept groups

        def rows(first_head: torch.Tensor, offset: int) -> torch.Tensor:
            return ((offset + first_head)[:, None] * D + torch.arange(D)).flatten()

        wqkv, wo = state[f"layers.{i}.attn.wqkv.weight"], state[f"layers.{i}.attn.wo.weight"]
        q, k, v = rows(heads, 0), rows(kept, c.n_heads), rows(kept, c.n_heads + c.n_kv_heads)
        state[f"layers.{i}.attn.wqkv.weight"] = wqkv[torch.cat([q, k, v])]  # rows [Q; K; V] of the kept heads
        state[f"layers.{i}.attn.wo.weight"] = wo[:, q]
    return _rebuild(model, replace(c, n_heads=KV * group, n_kv_heads=KV), state)


def block_scores(model, windows: torch.Tensor) -> torch.Tensor:
    """(n_layers,): 1 - mean cosine similarity of each block's input and output."""
    return torch.stack([1 - torch.nn.functional.cosine_similarity(x, y, dim=-1).mean() for x, y in block_io(model, windows)])


def prune_blocks(model, remove: int, scores: torch.Tensor):
    """A new model without the `remove` blocks that change their input least."""
    c = model.config
    if not 0 <= remove < c.n_layers:
        raise DojoError(f"the model has {c.n_layers} blocks: remove 0 to {c.n_layers - 1}; got {remove}")
    dropped = set(torch.topk(-scores, remove).indices.tolist()) if remove else set()
    return keep_blocks(model, [i for i in range(c.n_layers) if i not in dropped])


def keep_blocks(model, blocks: list[int]):
    """A new model made of these blocks of `model`, in this order, with its embedding, final
    norm and head. Example: keep_blocks(model, list(range(0, 30, 2))) keeps every other block."""
    c = model.config
    if not blocks or any(not 0 <= i < c.n_layers for i in blocks) or len(set(blocks)) != len(blocks):
        raise DojoError(f"blocks to keep must be distinct indices in [0, {c.n_layers - 1}], at least one; got {blocks}")
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("layers."):
            index, rest = key.split(".", 2)[1:]
            if int(index) not in blocks:
                continue
            key = f"layers.{blocks.index(int(index))}.{rest}"
        state[key] = value
    return _rebuild(model, replace(c, n_layers=len(blocks)), state)
