"""Integer formats for weights and activations.

A quantized tensor stores small integers q (the codes) and, per group of values, a float
scale s and sometimes a zero point z:

    symmetric:   x ~ s * q,        q in [-(2^(b-1) - 1), 2^(b-1) - 1]   s = max|x| / qmax
    asymmetric:  x ~ s * (q - z),  q in [0, 2^b - 1]                    s = (max - min) / (2^b - 1)

Symmetric int8 uses [-127, 127], not [-128, 127]: the code -128 is left out, so that x and
-x quantize to q and -q and zero stays exactly zero. Asymmetric formats spend every code on
the range [min, max] of the group, extended to include 0 so that z is an integer code (a
zero in the weights, padding, ReLU outputs stays exactly zero). Rounding is to nearest
(`torch.round`, ties to even); truncating instead biases every value towards zero.

Granularity, from coarse to fine (more scales stored, smaller error):
  - "tensor": one scale for the whole matrix: one outlier sets the step for everything;
  - "channel": one scale per output row of a weight (W is (out, in)), or per token of an
    activation;
  - a group size g: one scale per g consecutive values along the input dimension
    (32, 64, 128), as GGUF's blocks and GPTQ's groups do.

A group of all zeros gets scale 1 (any positive value would do: its codes are all zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DojoError

SUPPORTED_BITS = (8, 4, 3)


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax). Example: int_range(8, True) -> (-127, 127); int_range(4, False) -> (0, 15)."""
    if bits not in SUPPORTED_BITS:
        raise DojoError(f"{bits}-bit integers are not supported; choose one of {', '.join(map(str, SUPPORTED_BITS))}")
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


@dataclass
class QuantizedTensor:
    """Codes and scales of a 2-D tensor (out, in), grouped along the input dimension.

    q: codes, int8 (symmetric) or uint8 (asymmetric), shape (out, in): one per value here
        (`pack_int4` halves int4's storage).
    scale, zero: float32, shape (out, in // group) for groups, (out, 1) per channel,
        (1, 1) per tensor; zero is None for symmetric formats.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group: int  # values per scale along the input dimension

    def dequantize(self) -> torch.Tensor:
        """float32 values s * (q - z), shape (out, in)."""
        q = self.q.float().view(self.scale.shape[0], -1, self.group)  # (rows, n_groups, group)
        zero = 0.0 if self.zero is None else self.zero.unsqueeze(-1)
        return ((q - zero) * self.scale.unsqueeze(-1)).reshape(self.q.shape)


def group_size_for(granularity: str | int, shape: tuple[int, int]) -> int:
    """Values per scale along the input dimension, checked against the tensor's shape."""
    out, n_in = shape
    if granularity == "tensor":
        return out * n_in
    if granularity == "channel":
        return n_in
    if isinstance(granularity, int) and not isinstance(granularity, bool) and granularity > 0:
        if n_in % granularity:
            divisors = [g for g in range(8, n_in + 1, 8) if n_in % g == 0]
            raise DojoError(f"group size {granularity} does not divide the input dimension {n_in}; "
                            f"group sizes that do: {', '.join(map(str, divisors)) or 'none (use per-channel)'}")
        return granularity
    raise DojoError(f"granularity must be 'tensor', 'channel' or a positive group size, got {granularity!r}")


def scale_and_zero(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) mapping [lo, hi] (per group) onto the integer range."""
    qmin, qmax = int_range(bits, symmetric)
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        return torch.where(amax > 0, amax / qmax, torch.ones_like(amax)), None
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # the range holds 0, so z is a whole code
    scale = torch.where(hi > lo, (hi - lo) / (qmax - qmin), torch.ones_like(hi))
    zero = (qmin - lo / scale).round().clamp(qmin, qmax)
    return scale, zero


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                   symmetric: bool) -> torch.Tensor:
    """q = clamp(round(x / s) + z, qmin, qmax), elementwise (scale and zero broadcast)."""
    qmin, qmax = int_range(bits, symmetric)
    q = (x / scale).round()
    if zero is not None:
        q = q + zero
    return q.clamp(qmin, qmax)


def quantize(w: torch.Tensor, bits: int = 8, symmetric: bool = True, granularity: str | int = "channel") -> QuantizedTensor:
    """Round-to-nearest quantization of a 2-D tensor (out, in).

    Example: quantize(torch.tensor([[0.5, -1.0, 0.25, 1.0]]), 8) has scale 1/127 and codes
    [64, -127, 32, 127] (0.5 * 127 = 63.5 rounds to the even 64)."""
    if w.dim() != 2:
        raise DojoError(f"quantize expects a 2-D tensor (out, in), got shape {tuple(w.shape)}")
    group = group_size_for(granularity, tuple(w.shape))
    rows = 1 if granularity == "tensor" else w.shape[0]
    g = w.detach().float().reshape(rows, -1, group)  # (rows, n_groups, group)
    scale, zero = scale_and_zero(g.amin(-1), g.amax(-1), bits, symmetric)  # (rows, n_groups)
    q = quantize_codes(g, scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1), bits, symmetric)
    return QuantizedTensor(q.to(code_dtype(symmetric)).reshape(w.shape), scale, zero, bits, group)


def code_dtype(symmetric: bool) -> torch.dtype:
    """int8 for symmetric codes, uint8 for asymmetric ones (int8 with a zero point uses 0..255)."""
    return torch.int8 if symmetric else torch.uint8


def fake_quantize(w: torch.Tensor, bits: int = 8, symmetric: bool = True, granularity: str | int = "channel") -> torch.Tensor:
    """The float values the quantized tensor stands for: dequantize(quantize(w))."""
    return quantize(w, bits, symmetric, granularity).dequantize().to(w.dtype)


# -- int4 packing: two codes per byte ------------------------------------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15] (asymmetric int4, or symmetric int4 + 8), two per byte along the last
    axis: value 2i in the low nibble, value 2i + 1 in the high nibble.
    Example: [1, 2, 15, 0] -> bytes [0x21, 0x0F]."""
    if q.shape[-1] % 2:
        raise DojoError(f"pack_int4 needs an even number of values along the last axis, got {q.shape[-1]}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise DojoError("pack_int4 takes codes in [0, 15]; shift symmetric codes by 8 first")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: uint8 codes in [0, 15], twice as many along the last axis."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


def bytes_per_weight(bits: int, group: int, symmetric: bool) -> float:
    """Storage per weight as `QuantizedLinear` keeps it: int8 codes one per byte, int4 and
    int3 two per byte (nibbles; packing 3-bit codes 8 to 3 bytes is a kernel's business), a
    float32 scale per group, and a one-byte zero point per group for asymmetric formats."""
    return (0.5 if bits <= 4 else 1.0) + (4 + (0 if symmetric else 1)) / group
