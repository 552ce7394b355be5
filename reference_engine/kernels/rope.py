"""Rotary position embeddings in Triton, "half" layout: feature i pairs with i + D/2.

For a pair (a, b) at angle t: (a cos t - b sin t, b cos t + a sin t). PyTorch's version
(`positional.apply_rope`) builds rotate_half(x) with a slice, a negation and a cat, then
two multiplies and an add: five passes over the heads. Here one program loads one token's
heads once, rotates them, and stores them once.
"""

from __future__ import annotations

import torch

from . import load_triton

triton = load_triton()
import triton.language as tl  # noqa: E402


@triton.jit
def rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, T, n_heads, half, x_b_stride, x_t_stride, x_head_stride,
                cs_tok_stride, y_tok_stride, y_head_stride, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0)  # one (batch, position) per program, all its heads at once
    batch, t = tok // T, tok % T
    heads = tl.arange(0, BLOCK_H)[:, None]
    i = tl.arange(0, BLOCK_D)[None, :]
    inside = (heads < n_heads) & (i < half)
    x_row = x_ptr + batch * x_b_stride + t * x_t_stride + heads * x_head_stride
    a = tl.load(x_row + i, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(x_row + half + i, mask=inside, other=0.0).to(tl.float32)
    # cos/sin tables repeat each angle in both halves: the first half holds all of them
    cos = tl.load(cos_ptr + tok * cs_tok_stride + i, mask=i < half, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + tok * cs_tok_stride + i, mask=i < half, other=0.0).to(tl.float32)
    y_row = y_ptr + tok * y_tok_stride + heads * y_head_stride
    tl.store(y_row + i, (a * cos - b * sin).to(y_ptr.dtype.element_ty), mask=inside)
    tl.store(y_row + half + i, (b * cos + a * sin).to(y_ptr.dtype.element_ty), mask=inside)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D), any strides with the last axis contiguous (the Q and K heads of a fused
    projection are a view), with cos, sin (B, T, 1, D) or (B, T, D) in the "half" layout, as
    `positional.apply_rope(x, cos, sin, "half")`. Returns a new (B, T, H, D) tensor."""
    B, T, H, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos = cos.reshape(B * T, D).contiguous()
    sin = sin.reshape(B * T, D).contiguous()
    y = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    rope_kernel[(B * T,)](x, cos, sin, y, T, H, D // 2, x.stride(0), x.stride(1), x.stride(2), cos.stride(0),
                          y.stride(1), y.stride(2), BLOCK_H=triton.next_power_of_2(H),
                          BLOCK_D=triton.next_power_of_2(D // 2))
    return y
