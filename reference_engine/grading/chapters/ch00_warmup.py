"""Chapter 0 (warm-up): stable softmax and masked softmax, the building blocks of attention.

Shapes differ on every axis (a transposed or wrong-axis answer cannot pass by accident),
inputs include magnitudes where exp() overflows in float32, and masks include rows with
nothing left to attend to.
"""

from __future__ import annotations

import torch

from ..tasks import Case, Check, Speed, Task, register

SOFTMAX_OPS = {
    "aten::softmax": "torch.softmax / F.softmax / Tensor.softmax",
    "aten::_softmax": "torch.softmax / F.softmax / Tensor.softmax",
    "aten::_safe_softmax": "a built-in softmax",
    "aten::log_softmax": "torch.log_softmax",
    "aten::_log_softmax": "torch.log_softmax",
}


def softmax64(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """softmax(x)_i = exp(x_i - max x) / sum_j exp(x_j - max x), in float64."""
    x = x.double()
    e = (x - x.amax(dim, keepdim=True)).exp()
    return e / e.sum(dim, keepdim=True)


def masked_softmax64(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over the entries where mask is True; rows with no True entry are all zeros."""
    s = scores.double().masked_fill(~mask, float("-inf"))
    peak = s.amax(dim, keepdim=True).clamp(min=torch.finfo(torch.float64).min)  # -inf rows -> finite
    e = (s - peak).exp() * mask
    total = e.sum(dim, keepdim=True)
    return torch.where(total > 0, e / total.clamp(min=1e-300), torch.zeros_like(e))


def softmax_cases(g: torch.Generator) -> list[Case]:
    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    return [
        Case("values", [randn(3, 5, 7)], {"dim": -1}, "shape (3, 5, 7), dim=-1"),
        Case("values", [randn(4, 9)], {}, "shape (4, 9), default dim"),
        Case("other_axes", [randn(3, 5, 7)], {"dim": 0}, "shape (3, 5, 7), dim=0"),
        Case("other_axes", [randn(2, 6, 4)], {"dim": 1}, "shape (2, 6, 4), dim=1"),
        Case("large_inputs", [randn(4, 11, scale=80.0)], {"dim": -1}, "shape (4, 11), values around +-200"),
        Case("large_inputs", [randn(6, 5, scale=80.0) + 500.0], {"dim": 0}, "shape (6, 5), dim=0, values near 500"),
    ]


def masked_cases(g: torch.Generator) -> list[Case]:
    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def mask(*shape):
        m = torch.rand(*shape, generator=g) > 0.4
        m[..., 0] = True  # every row keeps at least one entry
        return m

    empty_rows = mask(3, 4, 6)
    empty_rows[0, 1] = False
    empty_rows[2, 3] = False
    return [
        Case("values", [randn(2, 3, 5), mask(2, 3, 5)], {"dim": -1}, "shape (2, 3, 5), dim=-1"),
        Case("values", [randn(4, 7), mask(4, 7)], {}, "shape (4, 7), default dim"),
        Case("values", [randn(5, 3, 4), mask(5, 3, 4)], {"dim": 0},
             "shape (5, 3, 4), dim=0"),
        Case("broadcast_mask", [randn(2, 3, 5), mask(2, 1, 5)], {"dim": -1},
             "scores (2, 3, 5) with mask (2, 1, 5), broadcast over the middle axis"),
        Case("fully_masked_rows", [randn(3, 4, 6), empty_rows], {"dim": -1},
             "shape (3, 4, 6) where two rows have no True entry"),
        Case("large_inputs", [randn(3, 8, scale=80.0), mask(3, 8)], {"dim": -1}, "shape (3, 8), values around +-200"),
    ]


BASELINE_SOFTMAX = """
    import torch

    def baseline(x, dim=-1):
        e = (x - x.amax(dim, keepdim=True)).exp()
        return e / e.sum(dim, keepdim=True)
"""


register(
    Task(
        id="0.1", chapter="ch00_warmup", title="stable softmax", function="stable_softmax", params=("x", "dim"),
        reference=softmax64, make_cases=softmax_cases,
        checks={
            "values": Check(3, "exponentiate, then divide by the sum over the same axis"),
            "other_axes": Check(2, "reduce over `dim`, keeping it (keepdim=True) so the shapes broadcast"),
            "large_inputs": Check(2, "exp() overflows float32 above about 88: subtract the max along `dim` first"),
        },
        forbidden_ops=SOFTMAX_OPS,
        speed=Speed(
            baseline_source=BASELINE_SOFTMAX, baseline_name="baseline",
            make_inputs=lambda g: [torch.randn(256, 1024, generator=g)], max_ratio=1.5,
            why="use whole-tensor operations (amax, exp, sum) along `dim`; a Python loop over rows or "
                "computing exp twice costs 2x to 100x",
        ),
    ),
    Task(
        id="0.2", chapter="ch00_warmup", title="masked softmax", function="masked_softmax",
        params=("scores", "mask", "dim"), reference=masked_softmax64, make_cases=masked_cases,
        checks={
            "values": Check(3, "positions where mask is False get probability 0; the rest sum to 1"),
            "broadcast_mask": Check(1, "let the mask broadcast against the scores (masked_fill and where do)"),
            "fully_masked_rows": Check(2, "a row with no True entry must come out as zeros, not NaN: "
                                          "softmax over nothing is undefined, so handle it explicitly"),
            "large_inputs": Check(1, "subtract the max of the kept entries before exp()"),
        },
        forbidden_ops=SOFTMAX_OPS,
    ),
)
