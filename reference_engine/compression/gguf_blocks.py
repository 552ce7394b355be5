"""The block formats of GGUF files, byte for byte, and their activation partners.

Each block holds 32 consecutive values of a row (so a row's length must be a multiple of
32), with its scale stored as float16 in front of the codes:

  Q8_0  34 bytes  d (fp16), 32 x int8 q                     x = d * q        d = max|x| / 127
  Q4_0  18 bytes  d (fp16), 16 bytes of 4-bit q             x = d * (q - 8)  d = x_absmax_signed / -8
  Q4_1  20 bytes  d, m (fp16), 16 bytes of 4-bit q          x = d * q + m    d = (max - min) / 15, m = min
  Q8_1  36 bytes  d, s (fp16), 32 x int8 q                  x = d * q        s = d * sum(q)

SmolLM2's file stores its linear layers as Q4_1 and the embedding as Q8_0. Q8_1 is never
stored in a file: llama.cpp quantizes the *activations* to it at run time, to multiply them
with Q4_1 weights in integers (the precomputed s carries the m * sum(x) term of Q4_1's
offset). Q4_0 takes its scale from the signed value of largest magnitude so that it maps
to code 0 exactly, spending the asymmetric range [-8, 7] where the extreme value lies.

4-bit codes are packed two per byte in ggml's order: byte j of a block holds value j in its
low nibble and value j + 16 in its high nibble (not values 2j and 2j + 1, the order of
`formats.pack_int4`).

Rounding follows ggml's reference quantizers: Q8 rounds half away from zero; Q4_0 and Q4_1
compute floor(v + 0.5) of an offset value that is never negative. The codes are computed
with the float32 scale, which is stored rounded to float16.
"""

from __future__ import annotations

import torch

from ..errors import DojoError

BLOCK = 32
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q8_1": 36}
KINDS = tuple(BLOCK_BYTES)


def _check(kind: str, n_values: int = 0) -> None:
    if kind not in BLOCK_BYTES:
        raise DojoError(f"unknown block format {kind!r}; choose one of {', '.join(KINDS)}")
    if n_values % BLOCK:
        raise DojoError(f"{kind} stores values in blocks of {BLOCK}: a row of {n_values} values does not fit")


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return x.sign() * (x.abs() + 0.5).floor()


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(..., 1) float32 -> (..., 2) uint8: the little-endian bytes of its float16 value."""
    return x.half().view(torch.uint8)  # view of a trailing size-1 axis as its 2 bytes


def _fp16_from(raw: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 -> (..., 1) float32."""
    return raw.contiguous().view(torch.float16).float()


def _pack_halves(q: torch.Tensor) -> torch.Tensor:
    """(..., 32) codes in [0, 15] -> (..., 16) bytes: value j low, value j + 16 high."""
    q = q.to(torch.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def _unpack_halves(packed: torch.Tensor) -> torch.Tensor:
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def quantize_blocks(x: torch.Tensor, kind: str) -> torch.Tensor:
    """float values (..., n) -> uint8 bytes (..., n // 32 * block bytes), as a GGUF file holds them."""
    _check(kind, x.shape[-1])
    b = x.detach().float().reshape(*x.shape[:-1], -1, BLOCK)  # (..., n_blocks, 32)
    if kind in ("Q8_0", "Q8_1"):
        d = b.abs().amax(-1, keepdim=True) / 127
        inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        q = _round_half_away(b * inverse)
        parts = [_fp16_bytes(d)]
        if kind == "Q8_1":
            parts.append(_fp16_bytes(d * q.sum(-1, keepdim=True)))
        parts.append(q.to(torch.int8).view(torch.uint8))
    elif kind == "Q4_0":
        extreme = b.gather(-1, b.abs().argmax(-1, keepdim=True))  # signed value of largest magnitude
        d = extreme / -8
        inverse = torch.where(d != 0, 1 / d, torch.zeros_like(d))
        q = (b * inverse + 8.5).floor().clamp(0, 15)
        parts = [_fp16_bytes(d), _pack_halves(q)]
    else:  # Q4_1
        lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
        d = (hi - lo) / 15
        inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        q = ((b - lo) * inverse + 0.5).floor().clamp(0, 15)
        parts = [_fp16_bytes(d), _fp16_bytes(lo), _pack_halves(q)]
    return torch.cat(parts, dim=-1).reshape(*x.shape[:-1], -1)


def dequantize_blocks(raw: torch.Tensor, kind: str) -> torch.Tensor:
    """uint8 bytes (..., n_blocks * block bytes) -> float32 values (..., n_blocks * 32)."""
    _check(kind)
    size = BLOCK_BYTES[kind]
    if raw.dtype != torch.uint8 or raw.shape[-1] % size:
        raise DojoError(f"{kind} data must be uint8 bytes in whole blocks of {size}; got {raw.dtype} "
                        f"with {raw.shape[-1]} bytes per row")
    b = raw.reshape(*raw.shape[:-1], -1, size)  # (..., n_blocks, block bytes)
    d = _fp16_from(b[..., 0:2])
    if kind == "Q8_0":
        x = d * b[..., 2:].contiguous().view(torch.int8).float()
    elif kind == "Q8_1":
        x = d * b[..., 4:].contiguous().view(torch.int8).float()
    elif kind == "Q4_0":
        x = d * (_unpack_halves(b[..., 2:]).float() - 8)
    else:  # Q4_1
        x = d * _unpack_halves(b[..., 4:]).float() + _fp16_from(b[..., 2:4])
    return x.reshape(*raw.shape[:-1], -1)


def q8_1_sums(raw: torch.Tensor) -> torch.Tensor:
    """The stored s = d * sum(q) of each Q8_1 block, float32 (..., n_blocks)."""
    b = raw.reshape(*raw.shape[:-1], -1, BLOCK_BYTES["Q8_1"])
    return _fp16_from(b[..., 2:4]).squeeze(-1)


def bytes_per_weight(kind: str) -> float:
    """Example: Q4_1 stores 32 values in 20 bytes: 0.625 bytes (5 bits) per weight."""
    return BLOCK_BYTES[kind] / BLOCK
