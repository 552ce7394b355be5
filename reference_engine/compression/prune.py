"""Unstructured and semi-structured pruning: which weights to set to zero.

A mask keeps (True) or removes (False) each weight of W (out, in). Three ways to choose:

  magnitude  remove the smallest |W|, per output row (each row loses the same count) or
             over the whole matrix ("global": rows with small weights lose more);
  Wanda      remove the smallest |W_ij| * ||X_j||, per output row, where ||X_j|| is the L2
             norm of input channel j over calibration tokens: a small weight on a channel
             that carries huge activations still matters (Sun et al., 2023);
  N:M        keep the N largest scores in every group of M consecutive inputs of a row
             (2:4 is what sparse tensor cores run at twice the dense speed).

Counts are exact: a row of n inputs at sparsity s loses floor(s * n) weights, never a
rounding more. Ties are broken the same way on every machine: among equal scores the one
with the lower input index is removed first (a stable sort).

Zeros alone do not make a matmul faster: a dense kernel multiplies them like any other
value. Speed needs a sparse format and a kernel that skips them (`sparse.py`), or
structure that removes whole rows and columns (`structured.py`).
"""

from __future__ import annotations

import math

import torch

from ..errors import DojoError
from .calibration import linear_input_sums


def check_sparsity(sparsity: float) -> float:
    if not 0.0 <= sparsity < 1.0:
        raise DojoError(f"sparsity is the fraction of weights removed, in [0, 1); got {sparsity}")
    return float(sparsity)


def pruned_count(sparsity: float, n: int) -> int:
    """floor(sparsity * n), immune to float error: 0.29 * 100 is 28.999999999999996 in floats."""
    return math.floor(sparsity * n + 1e-9)


def _remove_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask over the last axis keeping all but the k lowest scores (ties: lower index removed first)."""
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        order = torch.sort(scores, dim=-1, stable=True).indices  # ascending; equal scores keep index order
        mask.scatter_(-1, order[..., :k], False)
    return mask


def magnitude_mask(w: torch.Tensor, sparsity: float, scope: str = "row") -> torch.Tensor:
    """Keep-mask removing the smallest |w|: floor(sparsity * in) per row, or floor(sparsity *
    numel) over the matrix with scope="global".

    Example: magnitude_mask(tensor([[0.1, -3.0, 0.2, 2.0]]), 0.5) -> [[False, True, False, True]]."""
    check_sparsity(sparsity)
    if scope == "row":
        return _remove_lowest(w.abs(), pruned_count(sparsity, w.shape[-1]))
    if scope == "global":
        return _remove_lowest(w.abs().flatten(), pruned_count(sparsity, w.numel())).view(w.shape)
    raise DojoError(f"magnitude pruning ranks per 'row' or 'global'; got {scope!r}")


def wanda_scores(w: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||: input_norm (in,) is each input channel's L2 norm over calibration tokens."""
    if input_norm.shape != (w.shape[-1],):
        raise DojoError(f"Wanda needs one activation norm per input channel: {w.shape[-1]}, got {tuple(input_norm.shape)}")
    return w.abs() * input_norm.to(w.dtype)


def wanda_mask(w: torch.Tensor, input_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask removing floor(sparsity * in) weights per row with the smallest |W| * ||X_j||."""
    check_sparsity(sparsity)
    return _remove_lowest(wanda_scores(w, input_norm), pruned_count(sparsity, w.shape[-1]))


def n_m_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the n largest scores in every group of m consecutive inputs of each row.

    Example: n_m_mask(tensor([[1., 4., 2., 3.]]), 2, 4) -> [[False, True, False, True]]."""
    if not 0 < n <= m or scores.shape[-1] % m:
        raise DojoError(f"an {n}:{m} pattern keeps n <= m of every m consecutive inputs; m must divide the "
                        f"{scores.shape[-1]} inputs and 0 < n <= m")
    groups = scores.reshape(*scores.shape[:-1], -1, m)  # (..., in / m, m)
    return _remove_lowest(groups, m - n).reshape(scores.shape)


def input_norms(model, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """||X_j|| for every input channel of every Linear of the blocks, over the calibration
    windows: {"layers.3.mlp.w2": (ffn_dim,), ...}, float32."""
    sums = linear_input_sums(model, windows, lambda x: x.float().square().sum(0))
    return {name: s.sqrt() for name, s in sums.items()}


def prune_model(model, method: str, sparsity: float = 0.5, norms: dict[str, torch.Tensor] | None = None,
                pattern: tuple[int, int] | None = None) -> dict[str, float]:
    """Zero weights of every Linear inside the blocks, in place (embedding and head untouched).

    method: "magnitude", "magnitude-global" (one ranking per matrix), or "wanda" (needs
    norms from `input_norms`). pattern=(2, 4) makes the mask N:M instead of a sparsity.
    Returns the fraction of weights removed per matrix. Every mask is computed before any
    weight changes, so an error leaves the model as it was."""
    from ..model import Linear

    if method not in ("magnitude", "magnitude-global", "wanda"):
        raise DojoError(f"pruning methods: magnitude, magnitude-global, wanda; got {method!r}")
    if method == "wanda" and norms is None:
        raise DojoError("Wanda ranks |W| times the input activation norms: pass norms=input_norms(model, windows)")
    masks = {}
    for name, module in model.layers.named_modules(prefix="layers"):
        if not isinstance(module, Linear):
            continue
        w = module.weight.detach()
        if pattern is not None:
            scores = wanda_scores(w, norms[name]) if method == "wanda" else w.abs()
            masks[name] = n_m_mask(scores, *pattern)
        elif method == "wanda":
            masks[name] = wanda_mask(w, norms[name], sparsity)
        else:
            masks[name] = magnitude_mask(w, sparsity, "global" if method == "magnitude-global" else "row")
    removed = {}
    modules = dict(model.layers.named_modules(prefix="layers"))
    with torch.no_grad():
        for name, mask in masks.items():
            modules[name].weight.mul_(mask)
            removed[name] = 1.0 - mask.float().mean().item()
    if any(modules[name].packed is not None for name in masks):
        model.pack_for_cpu()  # the packed copies went stale with the edit: copy the pruned weights
    return removed
