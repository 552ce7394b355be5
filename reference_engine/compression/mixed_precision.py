"""Mixed precision: 16-bit weights and activations, float32 where 16 bits are not enough.

Halving the bytes of every weight halves what a decode step reads, and on CPUs with
AVX-512 BF16 (this machine) or on GPUs the matmuls themselves run in 16 bits. Some
computations stay in float32 whatever the model's dtype:
  - the sums inside every matmul (oneDNN and cuBLAS accumulate 16-bit products in float32:
    a bfloat16 running sum, 8 bits of mantissa, stops growing once it is 256x larger than
    the terms it adds);
  - normalisation statistics (`model.RMSNorm` computes mean(x^2) in float32: in float16,
    x^2 overflows past |x| = 256, and SmolLM2's residual stream has channels that large);
  - softmax inside attention (PyTorch's CPU attention kernels keep float32 running maxima
    and sums) and the final logits (`Transformer.head` returns float32).
bfloat16 keeps float32's exponent range (8 bits) with a short mantissa (7 bits): no
overflow, coarser values. float16 has a finer mantissa (10 bits) and a range that ends
at 65504: what overflows is what this module exists to keep in float32.
"""

from __future__ import annotations

import torch

from .. import fused_decode
from ..errors import DojoError


def to_mixed_precision(model, dtype: torch.dtype):
    """Convert `model` in place to bfloat16 or float16 and return it."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise DojoError(f"mixed precision runs in torch.bfloat16 or torch.float16, not {dtype}")
    model.to(dtype)
    for module in model.modules():  # the float32 copies kept for the compiled decode path no longer apply
        if getattr(module, "packed", None) is not None:
            module.packed = None
    model.tied_head_packed = None
    fused_decode.forget(model)
    return model


def float16_overflow(x: torch.Tensor) -> dict:
    """What happens to RMSNorm's statistic mean(x^2) of hidden states x (..., d) when it is
    computed in float16 rather than float32: the largest |x|, how many rows overflow to inf,
    and the largest value float16 holds."""
    sq16 = x.half().pow(2).mean(-1)
    return {"max_abs": float(x.abs().max()), "rows": int(sq16.numel()),
            "rows_inf_in_fp16": int(torch.isinf(sq16).sum()), "fp16_max": float(torch.finfo(torch.float16).max)}
