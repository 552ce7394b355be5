"""The compiled integer matmul's view of a quantized weight, and its PyTorch twin.

The kernel (`csrc/quant_matmul.cpp`) multiplies int8 activations by unsigned weight codes
with AVX-512 VNNI. Every format it covers is first rewritten, once, as

    w = d * u + m     u: unsigned code (4 or 8 bits); d, m: float32 per output and block of 32

  Q4_1            u = q,        m = min (the file's fp16 d and m, exactly)
  Q4_0, int4/3    u = q + 8,    m = -8 d          (symmetric codes shifted into [1, 15])
  int4/3 zp       u = q,        m = -d * zero
  Q8_0, int8      u = q + 128,  m = -128 d        (VNNI multiplies unsigned by signed bytes)
  int8 zp         u = q,        m = -d * zero

and laid out for the instruction (see the kernel's comment): groups of 16 outputs, blocks
of 32 inputs, 256 bytes of 4-bit or 512 of 8-bit codes per group and block. Groups of
scales of 64 or 192 inputs repeat their scale in every block of 32 they span. GGUF's
scales stay float16 (exact); symmetric formats store no m (it is -8 d or -128 d). Q4_1 is
then 20 bytes per 32 weights, as in the file, and Q8_0 34.

The activations are quantized too, per row and block of 32 inputs (`quantize_activations`):
dx = max|x| / 127, a = round(x / dx) in [-127, 127]. That is the arithmetic of llama.cpp's
Q8_1 partner blocks (it rounds half away from zero; here half to even, as torch.round), and
it costs some accuracy: the README and `bench` state it per format. The PyTorch path
computes the same thing in float (quantize, dequantize, F.linear), so a model gives the
same tokens with or without the compiled kernels, up to the order of float sums.

Not covered (they keep the PyTorch path): w8a8 (its activations are per token), groups that
are not a multiple of 32, inputs that are not a multiple of 32, biases of the wrong dtype.
"""

from __future__ import annotations

import torch

from . import gguf_blocks
from .formats import unpack_int4

BLOCK = 32  # inputs per activation scale and per kernel block
LANES = 16  # outputs per group (one 512-bit register of int32 sums)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) float32 rounded to int8 per block of 32 and scaled back: what the kernel multiplies.

    Example: a block whose largest magnitude is 2.54 gets dx = 0.02; 1.0 -> 50 * 0.02 = 1.0,
    0.011 -> 1 * 0.02 = 0.02 (half a step off, at most)."""
    blocks = x.reshape(*x.shape[:-1], -1, BLOCK)  # (..., K / 32, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))  # the kernel's 1 / dx, same float
    return ((blocks * inverse).round() * scale).reshape(x.shape)


def unsigned_codes(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """(u (out, in) uint8, d (out, in / 32), m (out, in / 32), bits) for a `QuantizedLinear`
    the kernel covers, else None."""
    n_out, n_in = layer.out_features, layer.in_features
    if n_in % BLOCK:
        return None
    if layer.kind == "gguf" and layer.block in ("Q4_1", "Q4_0", "Q8_0"):
        size = gguf_blocks.BLOCK_BYTES[layer.block]
        b = layer.raw.view(n_out, n_in // BLOCK, size)  # (out, blocks, bytes)
        d = b[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)
        if layer.block == "Q8_0":
            u = (b[..., 2:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
            return u.reshape(n_out, n_in), d, -128 * d, 8
        half = 2 if layer.block == "Q4_0" else 4
        u = torch.cat([b[..., half:] & 0x0F, b[..., half:] >> 4], dim=-1)  # value j low, j + 16 high
        m = -8 * d if layer.block == "Q4_0" else b[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1)
        return u.reshape(n_out, n_in), d, m, 4
    if layer.kind != "int" or layer.scale.shape[0] != n_out or layer.group % BLOCK or n_in % layer.group:
        return None
    per = layer.group // BLOCK
    d = layer.scale.float().repeat_interleave(per, dim=1)  # (out, in / 32)
    zero = layer.zero.float().repeat_interleave(per, dim=1) if hasattr(layer, "zero") else None
    if layer.bits <= 4:
        u = unpack_int4(layer.codes)  # symmetric codes are stored + 8
        m = -8 * d if zero is None else -d * zero
        return u, d, m, 4
    if zero is None:
        return (layer.codes.to(torch.int16) + 128).to(torch.uint8), d, -128 * d, 8
    return layer.codes.to(torch.uint8), d, -d * zero, 8


def repack(u: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's layout: codes (groups, blocks, 256 or 512) uint8, d and m (groups, blocks, 16).

    For 8 bits, bytes 4i..4i+3 of chunk t (64 bytes) are output i's codes for inputs
    4t..4t+3 of the block. For 4 bits, chunk c holds inputs 8c..8c+3 of output i in the
    low nibbles of bytes 4i..4i+3 and inputs 8c+4..8c+7 in their high nibbles."""
    n_out, n_in = u.shape
    groups, nb = -(-n_out // LANES), n_in // BLOCK
    pad = groups * LANES - n_out  # past the last output: codes 0, d = m = 0
    u = torch.nn.functional.pad(u, (0, 0, 0, pad))
    d, m = (torch.nn.functional.pad(t.float(), (0, 0, 0, pad)) for t in (d, m))
    u = u.view(groups, LANES, nb, BLOCK).permute(0, 2, 1, 3)  # (groups, blocks, lane i, input k)
    if bits == 8:
        codes = u.reshape(groups, nb, LANES, 8, 4).permute(0, 1, 3, 2, 4)  # (g, b, chunk t, lane, 4)
    else:
        k = u.reshape(groups, nb, LANES, 4, 2, 4)  # (g, b, lane, chunk c, low/high, 4)
        codes = (k[..., 0, :] | (k[..., 1, :] << 4)).permute(0, 1, 3, 2, 4)  # (g, b, chunk c, lane, 4)
    codes = codes.reshape(groups, nb, -1).contiguous()
    lay = lambda t: t.view(groups, LANES, nb).transpose(1, 2).contiguous()  # (groups, blocks, 16)
    return codes, lay(d), lay(m)


def offset_factor(layer) -> float | None:
    """c where m = c * d for every block (symmetric codes shifted into unsigned ones), so
    that m need not be stored; None where m is stored (Q4_1, formats with a zero point)."""
    if layer.kind == "gguf":
        return {"Q4_0": -8.0, "Q8_0": -128.0}.get(layer.block)
    if hasattr(layer, "zero"):
        return None
    return -8.0 if layer.bits <= 4 else -128.0


class KernelWeight:
    """A layer's weight in the kernel's layout, with the versions of the buffers it was
    made from: an edited or replaced buffer makes it stale (`current`), as `PackedWeight`."""

    def __init__(self, layer):
        self.n_buffers = len(layer._buffers)
        self.sources = [(name, buf, buf._version) for name, buf in layer._buffers.items() if name != "bias"]
        u, d, m, bits = unsigned_codes(layer)
        self.codes, self.d, self.m = repack(u, d, m, bits)
        if layer.kind == "gguf":  # the file's scales are float16: keeping them so is exact, and 4 bytes per block less
            self.d, self.m = self.d.half(), self.m.half()
        factor = offset_factor(layer)
        if factor is not None:  # symmetric codes: m = factor * d, computed in the kernel, not read
            self.m = torch.tensor([factor])
        self.bits = bits

    def __deepcopy__(self, memo):
        return None  # a copy runs the PyTorch twin (same arithmetic) until prepare_kernel repacks it

    def current(self, layer) -> bool:
        """Checked before every call, so kept cheap: a few dictionary lookups."""
        buffers = layer._buffers
        return len(buffers) == self.n_buffers and all(
            buffers.get(name) is buf and buf._version == version for name, buf, version in self.sources)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.d, self.m))
