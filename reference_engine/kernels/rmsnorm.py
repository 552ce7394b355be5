"""Fused RMSNorm in Triton: y = x / sqrt(mean(x^2) + eps) * weight, one program per row.

Unfused, PyTorch runs pow, mean, add, rsqrt, multiply, multiply: each reads its input from
memory and writes its output back. The add and the rsqrt work on one number per row, so
that is 4 reads and 3 writes of a row (x, x^2, x, x * rsqrt; x^2, x * rsqrt, y). Fused, the
row is read once and written once (3.5x fewer bytes); the statistic lives in registers. The square and the mean are
taken in float32 whatever the input dtype (x^2 overflows float16 once |x| > 256).
"""

from __future__ import annotations

import torch

from . import load_triton

triton = load_triton()
import triton.language as tl  # noqa: E402


@triton.jit
def rmsnorm_kernel(x_ptr, w_ptr, y_ptr, n_cols, x_row_stride, y_row_stride, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)  # masked lanes are 0: they add nothing
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * y_row_stride + cols, (x * inv_rms * w).to(y_ptr.dtype.element_ty), mask=inside)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis of x (any leading shape); y has x's shape and dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    rmsnorm_kernel[(x2.shape[0],)](x2, weight, y, shape[-1], x2.stride(0), y.stride(0), eps,
                                   BLOCK=triton.next_power_of_2(shape[-1]))
    return y.view(shape)
