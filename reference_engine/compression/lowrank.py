"""Low-rank factorisation: a linear layer W (out, in) as two thinner ones, W ~ A B with
A (out, r) and B (r, in).

Truncated SVD gives the best rank-r approximation in the Frobenius norm (Eckart-Young):
W = U S V^T, keep the r largest singular values, A = U_r S_r, B = V_r^T, and the error
||W - A B||_F is exactly sqrt(sum of the discarded s_i^2). The two factors hold r (out + in)
numbers against out * in, so they are smaller only below the break-even rank
floor(out * in / (out + in)): 288 for SmolLM2's 576 x 576 output projection, 418 for its
1536 x 576 down projection.

What matters for the model is not ||W - W'|| but the error on the outputs it produces,
||X W^T - X W'^T|| over real inputs X. Activation-aware ("whitened") SVD, as in SVD-LLM,
factors W C instead of W, where C C^T = X^T X (the inputs' Gram matrix, from calibration
text, by Cholesky): then ||X (W - W')^T||_F = ||(W - W') C||_F, and truncating the SVD of
W C minimises it. The factors are A = U_r S_r and B = V_r^T C^{-1}.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DojoError
from .calibration import linear_input_sums


def break_even_rank(out_features: int, in_features: int) -> int:
    """The largest rank whose factors are no larger than W: r (out + in) <= out * in."""
    return out_features * in_features // (out_features + in_features)


def check_rank(rank: int, w: torch.Tensor) -> int:
    if not 1 <= rank <= min(w.shape):
        raise DojoError(f"rank must be in [1, {min(w.shape)}] for a {tuple(w.shape)} weight; got {rank}")
    return rank


def svd_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (out, r), B (r, in)) with A @ B the best rank-r approximation of w; computed in float64."""
    check_rank(rank, w)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]).to(w.dtype), vh[:rank].to(w.dtype)


def whitened_factors(w: torch.Tensor, gram: torch.Tensor, rank: int, damp: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) minimising ||X (W - A B)^T||_F for inputs X with X^T X = gram (in, in).

    subtle: the Gram matrix of real activations is often singular (dead channels), so a
    small multiple of its mean diagonal is added before the Cholesky factorisation."""
    check_rank(rank, w)
    n = w.shape[1]
    if gram.shape != (n, n):
        raise DojoError(f"the inputs' Gram matrix must be ({n}, {n}) for a {tuple(w.shape)} weight; got {tuple(gram.shape)}")
    g = gram.double()
    g = g + damp * g.diagonal().mean().clamp(min=1e-12) * torch.eye(n, dtype=torch.float64)
    c = torch.linalg.cholesky(g)  # lower triangular, C C^T = X^T X
    u, s, vh = torch.linalg.svd(w.double() @ c, full_matrices=False)
    b = torch.linalg.solve_triangular(c, vh[:rank], upper=False, left=False)  # V_r^T C^{-1}
    return (u[:, :rank] * s[:rank]).to(w.dtype), b.to(w.dtype)


class LowRankLinear(nn.Module):
    """y = (x B^T) A^T + bias: two thin matmuls in place of one (out, in) matmul."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = b.shape[1], a.shape[0], a.shape[1]
        self.a = nn.Parameter(a.contiguous(), requires_grad=False)  # (out, r)
        self.b = nn.Parameter(b.contiguous(), requires_grad=False)  # (r, in)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.b), self.a, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def input_grams(model, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """X^T X (in, in), float64, of every Linear inside the blocks over the calibration windows."""
    return linear_input_sums(model, windows, lambda x: x.double().T @ x.double())


def factorize_model(model, ratio: float, grams: dict[str, torch.Tensor] | None = None,
                    names: tuple[str, ...] = ("wqkv", "wo", "w13", "w2")) -> dict[str, int]:
    """Replace the blocks' linears named in `names` by LowRankLinear at rank round(ratio *
    break-even rank) (whitened where grams are given), in place. Returns the rank per layer.
    All factors are computed before any layer is swapped: an error leaves the model as it was."""
    from ..model import Linear

    if not 0.0 < ratio <= 1.0:
        raise DojoError(f"ratio is the rank as a fraction of the break-even rank, in (0, 1]; got {ratio}")
    todo = [(name, m) for name, m in model.layers.named_modules(prefix="layers")
            if isinstance(m, Linear) and name.rsplit(".", 1)[-1] in names]
    new, ranks = {}, {}
    for name, m in todo:
        w = m.weight.detach()
        rank = max(1, round(ratio * break_even_rank(*w.shape)))
        a, b = svd_factors(w, rank) if grams is None else whitened_factors(w, grams[name], rank)
        new[name], ranks[name] = LowRankLinear(a, b, m.bias), rank
    for name, layer in new.items():
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, layer)
    return ranks
