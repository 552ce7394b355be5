"""`QuantizedLinear`: how a quantized weight is stored, and how it is multiplied.

Three storages, one module (y = x W^T + b for x (..., in), W (out, in)):

  - "int"  integer codes with a scale (and zero point) per output channel or per group of
           the input dimension (`formats.py`): int8 one code per byte, int4 and int3 two
           per byte (a dense 3-bit layout would save another eighth; that is a kernel's
           business). Weight-only: the activations stay float.
  - "gguf" GGUF blocks kept as raw bytes (`gguf_blocks.py`): SmolLM2's own Q4_1 linears
           and Q8_0 embedding, or any matrix requantized to Q8_0 / Q4_0 / Q4_1.
  - "w8a8" int8 weights per output channel AND int8 activations per token, quantized at
           run time: the matmul itself is int8 x int8 with int32 accumulation, rescaled
           once per output by (activation scale x weight scale).

The PyTorch path here is the readable one: weight-only formats dequantize the whole matrix
to float32 in every call and then run F.linear, so they cost more time than float32 (the
codes are read, then a float32 copy is written and read), not less; their memory is what
shrinks. Decoding faster than float32 takes a kernel that multiplies the codes where they
lie, reading fewer bytes: `prepare_kernel` (called by `Transformer.pack_for_cpu`, so by
`load_model(quantize=...)`) repacks the codes once for the compiled integer matmul
(`kernel_layout.py`) and switches the layer to int8 activations per block of 32, the
arithmetic that kernel does. The PyTorch path then does the same arithmetic in float, so
the compiled kernels change the speed, not the tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import cpu_kernels
from . import gguf_blocks
from .formats import QuantizedTensor, pack_int4, quantize, unpack_int4
from .kernel_layout import KernelWeight, quantize_activations, unsigned_codes


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (m, k) int8 @ b (k, n) int8 -> int32 (m, n), exact.

    subtle: the products are summed in int32 (exact); float32 sums of int8 products are
    exact only while they stay under 2^24, which 1536 products of 127 x 127 can exceed.
    torch._int_mm is PyTorch's int8 GEMM; the tests hold it to a float64 reference on every
    shape the engine uses (an accumulator bug in it has been reported on AMD CPUs)."""
    if a.shape[0] > 0 and a.is_cpu:
        try:
            return torch._int_mm(a.contiguous(), b)
        except RuntimeError:  # a shape or a build without it: the slow exact path
            pass
    return a.int() @ b.int()


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is kept quantized (see the module docstring)."""

    activations = "float"  # or "int8": quantized per row and block of 32 (`prepare_kernel`)
    kernel: KernelWeight | None = None  # the codes in the compiled matmul's layout

    def __init__(self, kind: str, in_features: int, out_features: int, bias: torch.Tensor | None,
                 tensors: dict[str, torch.Tensor], bits: int = 8, group: int = 0, block: str = ""):
        super().__init__()
        self.kind, self.in_features, self.out_features = kind, in_features, out_features
        self.bits, self.group, self.block = bits, group, block
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> QuantizedLinear:
        """Weight-only, from codes and scales (`formats.quantize`, or GPTQ's)."""
        out, n_in = qt.q.shape
        codes = qt.q
        if qt.bits <= 4:  # two per byte; symmetric codes [-7, 7] (int3: [-3, 3]) shifted by 8 into [1, 15]
            codes = pack_int4(codes.to(torch.int16) + (8 if qt.zero is None else 0))
        tensors = {"codes": codes.contiguous(), "scale": qt.scale.float().contiguous()}
        if qt.zero is not None:
            tensors["zero"] = qt.zero.to(torch.uint8).contiguous()
        return cls("int", n_in, out, bias, tensors, bits=qt.bits, group=qt.group)

    @classmethod
    def from_blocks(cls, raw: torch.Tensor, block: str, in_features: int,
                    bias: torch.Tensor | None = None) -> QuantizedLinear:
        """GGUF blocks kept as they are: raw (out, bytes per row) uint8."""
        return cls("gguf", in_features, raw.shape[0], bias, {"raw": raw.contiguous()}, block=block)

    @classmethod
    def w8a8(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> QuantizedLinear:
        """int8 weights per output channel; activations quantized per token at run time."""
        qt = quantize(weight, 8, symmetric=True, granularity="channel")
        tensors = {"codes_t": qt.q.t().contiguous(), "scale": qt.scale.reshape(1, -1).contiguous()}  # (in, out), (1, out)
        return cls("w8a8", weight.shape[1], weight.shape[0], bias, tensors, bits=8, group=weight.shape[1])

    # -- using -------------------------------------------------------------------------------------

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 matrix (out, in) this layer stands for."""
        if self.kind == "gguf":
            return gguf_blocks.dequantize_blocks(self.raw, self.block)
        if self.kind == "w8a8":
            return (self.codes_t.float() * self.scale).t()
        zero = self.zero.float() if hasattr(self, "zero") else None
        codes = self.codes
        if self.bits <= 4:
            codes = unpack_int4(codes).to(torch.int16) - (0 if zero is not None else 8)
        return QuantizedTensor(codes, self.scale, zero, self.bits, self.group).dequantize()

    def prepare_kernel(self) -> bool:
        """Switch to int8 activations per block of 32 and repack the codes for the compiled
        integer matmul. False, changing nothing, for a format it does not cover."""
        if self.activations == "int8" and self.kernel is not None and self.kernel.current(self):
            return True
        if unsigned_codes(self) is None:
            return False
        for name, buf in self._buffers.items():
            if buf is not None and buf.is_inference():
                # subtle: GPTQ builds its layers under inference_mode, and inference tensors
                # have no version counter, which the repacked copy watches for edits
                with torch.inference_mode(False):
                    self._buffers[name] = buf.clone()
        self.kernel, self.activations = KernelWeight(self), "int8"
        return True

    def kernel_fits(self, x: torch.Tensor) -> bool:
        """The compiled matmul can run: built, a current repacked copy, float32 on the CPU, no gradient wanted."""
        return (self.kernel is not None and cpu_kernels._loaded is not None and x.dtype == torch.float32
                and x.is_cpu and not (torch.is_grad_enabled() and x.requires_grad) and self.kernel.current(self))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.activations == "int8":
            if self.kernel_fits(x):
                k = self.kernel
                y = cpu_kernels._loaded.quant_linear(x.reshape(-1, self.in_features).contiguous(), k.codes, k.d, k.m,
                                                     self.out_features)
                y = y.view(*x.shape[:-1], self.out_features)
                return y if bias is None else y + bias
            x = quantize_activations(x.float()).to(x.dtype)  # the same arithmetic, in float
        if self.kind != "w8a8":
            return F.linear(x, self.dequantized_weight().to(x.dtype), bias)
        per_token = quantize(x.reshape(-1, self.in_features).float(), 8, True, "channel")  # a scale per row
        y = int8_matmul(per_token.q, self.codes_t).float() * per_token.scale * self.scale  # int32 sums, rescaled once
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    @property
    def weight_bytes(self) -> int:
        """Bytes read per use: codes, scales, zero points or raw blocks (not the bias)."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name != "bias")

    @property
    def weight_bytes_read(self) -> int:
        """Bytes one call reads: the repacked copy's where the compiled kernel runs, else `weight_bytes`."""
        if self.kernel is not None and cpu_kernels._loaded is not None and self.kernel.current(self):
            return self.kernel.nbytes
        return self.weight_bytes

    @property
    def storage(self) -> str:
        """How the weight is kept, in words. Example: "int4, 32 values per scale, zero point"."""
        return {"int": f"int{self.bits}, {self.group} values per scale" + (", zero point" if hasattr(self, "zero") else ""),
                "gguf": self.block, "w8a8": "int8 weights per channel x int8 activations per token"}[self.kind]

    def extra_repr(self) -> str:
        acts = ", int8 activations per 32 inputs" if self.activations == "int8" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.storage}{acts}"

