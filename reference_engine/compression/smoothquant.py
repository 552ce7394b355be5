"""SmoothQuant (Xiao et al., 2022): make activations easy to quantize by moving their
per-channel outliers into the weights, with a change that leaves the model's function
exactly as it was.

A few input channels of an LLM's linear layers carry values 10-100x larger than the rest,
in every token. Quantized per token, that one channel sets the step for the whole row and
the other channels are left with a handful of codes. For any positive s (one per input
channel j):

    y = x W^T = (x / s) (W * s)^T        (column j of W multiplied by s_j)

so dividing the activations by s and multiplying the weights' columns by s computes the
same y. With  s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha),  alpha = 0.5 splits the
difficulty evenly between activations and weights; alpha -> 1 moves it all to the weights.

The division is free when folded into whatever produced x (nothing is computed at run
time), which in a Llama block is:
  - Q, K, V and gate/up read RMSNorm's output:   norm weight / s, their columns * s;
  - down (w2) reads silu(gate) * up:              up's rows / s (the product scales with it);
  - wo reads the attention output, a weighted sum of V rows: V's rows / s, wo's columns * s.
    subtle: with grouped-query attention one V head serves several query heads, so the
    channels (h, d) of the heads sharing a K/V head must share one s: their statistics are
    pooled (max) over the group.
"""

from __future__ import annotations

import torch

from .calibration import block_inputs


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha), the weight max taken over every matrix
    that reads channel j. Channels never active (or whose weights are all zero) get s = 1."""
    w_absmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0).float()  # (in,)
    s = act_absmax.float().clamp(min=1e-5) ** alpha / w_absmax.clamp(min=1e-5) ** (1 - alpha)
    return torch.where((act_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s))


@torch.inference_mode()
def activation_absmax(model, windows: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per layer: max |x| per input channel of wqkv, wo, w13 and w2 over the windows."""
    stats = [{} for _ in model.layers]
    hooks = []
    for i, layer in enumerate(model.layers):
        for name in ("wqkv", "wo", "w13", "w2"):
            module = getattr(layer.attn if name in ("wqkv", "wo") else layer.mlp, name)

            def record(_module, args, i=i, name=name):
                peak = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
                stats[i][name] = torch.maximum(stats[i].get(name, peak), peak)

            hooks.append(module.register_forward_pre_hook(record))
    from tqdm import tqdm

    try:
        x, rope, mask = block_inputs(model, windows)
        for layer in tqdm(model.layers, desc="SmoothQuant: activation ranges", unit="block", disable=None, leave=False):
            x = layer(x, rope, 0, mask)
    finally:
        for h in hooks:
            h.remove()
    return stats


def smoothed_state(model, stats: list[dict[str, torch.Tensor]], alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """New values for the parameters SmoothQuant changes (norm weights, wqkv, w13, w2, wo),
    by their state-dict names; the model itself is not touched."""
    c = model.config
    H, KV, D, F = c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim
    new = {}
    for i, (layer, st) in enumerate(zip(model.layers, stats)):
        p = f"layers.{i}."
        wqkv, wo = layer.attn.wqkv.weight.detach().clone(), layer.attn.wo.weight.detach().clone()
        w13, w2 = layer.mlp.w13.weight.detach().clone(), layer.mlp.w2.weight.detach().clone()
        # norms -> wqkv, w13
        s = smoothing_scales(st["wqkv"], [wqkv], alpha)
        new[p + "attn_norm.weight"] = layer.attn_norm.weight.detach() / s
        wqkv *= s
        s = smoothing_scales(st["w13"], [w13], alpha)
        new[p + "ffn_norm.weight"] = layer.ffn_norm.weight.detach() / s
        w13 *= s
        # up -> w2
        s = smoothing_scales(st["w2"], [w2], alpha)
        w13[F:] /= s[:, None]
        w2 *= s
        # V -> wo, one s per (K/V head, d), pooled over the query heads of each group
        group = H // KV
        act = st["wo"].view(KV, group, D).amax(1)  # (KV, D)
        w_max = wo.abs().amax(0).view(KV, group, D).amax(1)  # (KV, D)
        s_kv = smoothing_scales(act.flatten(), [w_max.flatten()[None]], alpha).view(KV, D)
        v_rows = slice((H + KV) * D, (H + 2 * KV) * D)
        wqkv[v_rows] /= s_kv.flatten()[:, None]
        wo *= s_kv[:, None, :].expand(KV, group, D).flatten()  # column (h, d) by s of h's K/V head
        new.update({p + "attn.wqkv.weight": wqkv, p + "attn.wo.weight": wo, p + "mlp.w13.weight": w13,
                    p + "mlp.w2.weight": w2})
    return new
