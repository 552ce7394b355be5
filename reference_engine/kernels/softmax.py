"""Row softmax in Triton: one program per row, the whole row in one block.

softmax(x)_i = exp(x_i - max x) / sum_j exp(x_j - max x). A block's width must be a power
of two, so a row of n_cols values is loaded into the next power of two with the extra
lanes masked: they read -inf (exp(-inf) = 0, so they add nothing to the sum) and are
never stored. One read of x and one write of y: a fused kernel moves 2 * n elements where
PyTorch's unfused max, subtract, exp, sum, divide move about 8 * n elements.
"""

from __future__ import annotations

import torch

from . import load_triton

triton = load_triton()
import triton.language as tl  # noqa: E402  (after load_triton chose interpreter or GPU)


@triton.jit
def softmax_kernel(x_ptr, y_ptr, n_cols, x_row_stride, y_row_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=inside, other=float("-inf")).to(tl.float32)
    x = x - tl.max(x, axis=0)  # subtract the max: exp never overflows
    e = tl.exp(x)
    y = e / tl.sum(e, axis=0)
    tl.store(y_ptr + row * y_row_stride + cols, y.to(y_ptr.dtype.element_ty), mask=inside)


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis (any leading shape; 2-D rows may be strided)."""
    shape = x.shape
    if x.dim() != 2 or x.stride(1) != 1:
        x = x.reshape(-1, shape[-1]).contiguous()
    rows, n_cols = x.shape
    y = torch.empty((rows, n_cols), dtype=x.dtype, device=x.device)
    softmax_kernel[(rows,)](x, y, n_cols, x.stride(0), y.stride(0), BLOCK=triton.next_power_of_2(n_cols))
    return y.view(shape)
