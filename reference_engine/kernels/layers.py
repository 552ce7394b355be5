"""The Triton kernels behind the engine's module interfaces (`Transformer.set_kernels`).

Each function has the signature of what it replaces and falls back to PyTorch, with the
reason in a comment, for the cases its kernel does not cover. Kernels compiled for a GPU
cannot read CPU tensors: on a machine with a GPU, a model on the CPU runs PyTorch's ops.
"""

from __future__ import annotations

import torch

from ..attention import ATTENTION_IMPLS
from ..model import rms_norm
from ..positional import apply_rope
from . import interpreted
from .flash_attention import flash_attention
from .rmsnorm import rmsnorm as triton_rmsnorm
from .rope import apply_rope as triton_rope


INTERPRETED = interpreted()


def runs_here(x: torch.Tensor) -> bool:
    return x.is_cuda or INTERPRETED


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if not runs_here(x):
        return rms_norm(x, weight, eps)
    return triton_rmsnorm(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    if layout != "half" or not runs_here(x):  # the kernel pairs i with i + D/2, as the engine loads SmolLM2
        return apply_rope(x, cos, sin, layout)
    return triton_rope(x, cos, sin)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              is_causal: bool) -> torch.Tensor:
    """The engine's attention interface. Without a mask the kernel covers both cases the
    model asks for: a prompt from slot 0 (causal) and a decode step (one query sees every
    key). A mask means padding or a prompt continuing a cache: the kernel takes no mask
    tensor (that would be a second input read per tile), so those go through PyTorch."""
    if mask is not None or not runs_here(q):
        return ATTENTION_IMPLS["sdpa"](q, k, v, mask, is_causal)
    return flash_attention(q, k, v, causal=is_causal)[0]
