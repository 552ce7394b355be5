"""Quantize a whole model: `quantize_model(model, "int4-g32")`, `model.quantize(...)`,
`load_model(quantize=...)` and the CLI's `--quantize FORMAT` all come here.

Formats (names as the CLI takes them):
  q4_1, q8_0, q4_0     GGUF blocks. Loaded from SmolLM2's file, q4_1 keeps the file's own
                       Q4_1 linears and Q8_0 embedding byte for byte: the model as shipped.
  int8                 int8 per output channel, symmetric, weight-only.
  intB-gG              B = 8, 4 or 3 bits, one scale per group of G inputs (32, 64, 192,
                       ...), with a zero point at 4 and 3 bits (int8 is symmetric),
                       weight-only; intB alone: per output channel.
  ...-gptq             the same format chosen by GPTQ on calibration text, not rounding.
  w8a8                 int8 weights per channel x int8 activations per token, int32 sums.
  w8a8-smooth          w8a8 after SmoothQuant (alpha 0.5, or the alpha given).
  bf16, fp16           mixed precision: 16-bit weights and activations, fp32 where needed.

The LM head (SmolLM2's is its embedding matrix) is quantized too, kept at 8 bits as
llama.cpp keeps its output layer: Q8_0 for the block formats, int8 per channel otherwise.
Everything is computed first and swapped in at the end, so an error (an unknown name, a
group size that does not divide a layer, too little calibration text) leaves the model as
it was.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch

from .. import fused_decode
from ..errors import DojoError
from . import gguf_blocks
from .calibration import block_inputs, calibration_windows
from .formats import SUPPORTED_BITS, group_size_for, quantize
from .gptq import gptq_quantize, hessian
from .qlinear import QuantizedLinear

FORMATS = {
    "q4_1": "GGUF Q4_1 blocks (SmolLM2's file as shipped: its own bytes)",
    "q8_0": "GGUF Q8_0 blocks",
    "q4_0": "GGUF Q4_0 blocks",
    "int8": "int8 per output channel, symmetric, weight-only",
    "int4-g32": "int4 with a scale and zero point per 32 inputs (any intB-gG: B = 8, 4 or 3, int8 symmetric; "
                "G must divide every layer's inputs, for SmolLM2 a divisor of 192 such as 32, 64, 96, 192)",
    "int4-g32-gptq": "the same, chosen by GPTQ on calibration text (any intB-gG-gptq)",
    "w8a8": "int8 weights per channel x int8 activations per token",
    "w8a8-smooth": "w8a8 after SmoothQuant (alpha 0.5)",
    "bf16": "bfloat16 weights and activations; norms, softmax and sums in float32",
    "fp16": "float16 weights and activations; norms, softmax and sums in float32",
}


@dataclass(frozen=True)
class Format:
    name: str
    kind: str  # "blocks", "int", "w8a8" or "float"
    bits: int = 8
    group: str | int = "channel"  # "channel" or a group size
    symmetric: bool = True
    method: str = "rtn"  # "rtn", "gptq" or "smooth"
    block: str = ""  # GGUF block format
    dtype: torch.dtype | None = None


def parse_format(name: str) -> Format:
    """A format from its name; an unknown name or bit width gets an error listing the valid ones."""
    name = name.strip().lower()
    if name in ("q4_1", "q8_0", "q4_0"):
        return Format(name, "blocks", bits=int(name[1]), block=name.upper())
    if name in ("bf16", "fp16"):
        return Format(name, "float", bits=16, dtype=torch.bfloat16 if name == "bf16" else torch.float16)
    if name in ("w8a8", "w8a8-smooth"):
        return Format(name, "w8a8", method="smooth" if name.endswith("smooth") else "rtn")
    match = re.fullmatch(r"int(\d+)(?:-g(\d+))?(-gptq)?", name)
    if match:
        bits = int(match[1])
        if bits not in SUPPORTED_BITS:
            raise DojoError(f"{bits}-bit integers are not supported ({name!r}); the engine quantizes to "
                            f"{', '.join(f'int{b}' for b in SUPPORTED_BITS)}")
        group = int(match[2]) if match[2] else "channel"
        if group == 0:
            raise DojoError(f"group size must be positive in {name!r}, for example int4-g32")
        # int8 is symmetric (its 255 codes are enough); 4 and 3 bits spend every code on [min, max]
        return Format(name, "int", bits, group, symmetric=bits == 8, method="gptq" if match[3] else "rtn")
    raise DojoError(f"unknown format {name!r}; formats are: " + "; ".join(f"{k} ({v})" for k, v in FORMATS.items()))


def linears_of(model) -> dict[str, torch.nn.Module]:
    """The matrices quantization replaces, by module name (the head is added separately)."""
    return {f"layers.{i}.{part}": module for i, layer in enumerate(model.layers)
            for part, module in (("attn.wqkv", layer.attn.wqkv), ("attn.wo", layer.attn.wo),
                                 ("mlp.w13", layer.mlp.w13), ("mlp.w2", layer.mlp.w2))}


def head_weight(model) -> torch.Tensor:
    """The LM head's matrix: its own (untied models), else the embedding's."""
    return model.lm_head.weight if "lm_head" in model._modules else model.tok_embeddings.weight


def quantize_model(model, fmt: str | Format, tokenizer=None, calibration: torch.Tensor | None = None,
                   alpha: float = 0.5, raw_blocks: dict[str, tuple[str, torch.Tensor]] | None = None):
    """Quantize `model` in place to `fmt` and return it.

    tokenizer: for the calibrated methods (-gptq, w8a8-smooth) when `calibration` (token
        windows (N, T)) is not given: 16 windows of 256 tokens of the pydoc text.
    raw_blocks: {module name: (block format, raw bytes (out, bytes per row))} of a GGUF
        file, kept as they are where they match the format (`load_model` passes them).
    """
    fmt = parse_format(fmt) if isinstance(fmt, str) else fmt
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise DojoError("the model is already quantized; load it again to quantize it to another format")
    if fmt.kind == "float":
        from .mixed_precision import to_mixed_precision

        return to_mixed_precision(model, fmt.dtype)
    c = model.config
    if fmt.method == "smooth" and not 0 < alpha <= 1:
        raise DojoError(f"SmoothQuant's alpha must be in (0, 1], got {alpha}")
    if fmt.method == "smooth" and (c.norm, c.mlp, c.bias) != ("rmsnorm", "swiglu", False):
        raise DojoError(f"{fmt.name} folds its scales into RMSNorm, SwiGLU's up projection and V: Llama-family "
                        f"models without biases only (this one has {c.norm}, {c.mlp}, bias={c.bias})")
    if model.tok_embeddings.weight.device.type != "cpu":
        raise DojoError(f"{fmt.name}: integer formats run on the CPU here; load the model with device='cpu'")
    targets = linears_of(model)
    check_shapes(fmt, {name: m.weight.shape for name, m in targets.items()})
    if fmt.method in ("gptq", "smooth") and calibration is None:
        if tokenizer is None:
            raise DojoError(f"{fmt.name} calibrates on real text: pass tokenizer= (or calibration= token windows)")
        calibration = calibration_windows(tokenizer)

    weights = {name: m.weight.detach() for name, m in targets.items()}
    changed = {}  # other parameters (norm weights) the method changes
    if fmt.method == "smooth":
        from .smoothquant import activation_absmax, smoothed_state

        changed = smoothed_state(model, activation_absmax(model, calibration), alpha)
        weights = {name: changed.pop(name + ".weight", w) for name, w in weights.items()}
    if fmt.method == "gptq":
        new = gptq_modules(model, calibration, fmt)
    else:
        new = {name: quantize_linear(weights[name], targets[name].bias, fmt, (raw_blocks or {}).get(name))
               for name in targets}
    head = head_module(model, fmt, (raw_blocks or {}).get("head"))

    # swap in: nothing above touched the model
    with torch.no_grad():
        for name, value in changed.items():
            model.get_parameter(name).copy_(value)
    for name, module in new.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    model.lm_head = head
    model.tied_head_packed = None
    fused_decode.forget(model)
    return model


def check_shapes(fmt: Format, shapes: dict[str, torch.Size]) -> None:
    """Every layer fits the format (the head, int8 per channel or Q8_0, has the blocks' width)."""
    for name, (out, n_in) in shapes.items():
        if fmt.kind == "blocks" and n_in % gguf_blocks.BLOCK:
            raise DojoError(f"{fmt.name} needs rows that are a multiple of {gguf_blocks.BLOCK} values; {name} has {n_in}")
        if fmt.kind == "int":
            group_size_for(fmt.group, (out, n_in))  # raises, naming the sizes that divide


def quantize_linear(weight: torch.Tensor, bias, fmt: Format, raw: tuple[str, torch.Tensor] | None = None):
    if fmt.kind == "blocks":
        if raw is not None and raw[0] == fmt.block:  # the file's own bytes
            return QuantizedLinear.from_blocks(raw[1], fmt.block, weight.shape[1], bias)
        return QuantizedLinear.from_blocks(gguf_blocks.quantize_blocks(weight, fmt.block), fmt.block, weight.shape[1], bias)
    if fmt.kind == "w8a8":
        return QuantizedLinear.w8a8(weight, bias)
    return QuantizedLinear.from_quantized(quantize(weight, fmt.bits, fmt.symmetric, fmt.group), bias)


def head_module(model, fmt: Format, raw: tuple[str, torch.Tensor] | None) -> QuantizedLinear:
    """The LM head at 8 bits: Q8_0 for block formats, int8 per channel otherwise."""
    weight = head_weight(model).detach()
    bias = getattr(model._modules.get("lm_head"), "bias", None)
    if fmt.kind == "blocks":
        return quantize_linear(weight, bias, parse_format("q8_0"), raw)
    return QuantizedLinear.from_quantized(quantize(weight, 8, True, "channel"), bias)


@torch.inference_mode()
def gptq_modules(model, calibration: torch.Tensor, fmt: Format) -> dict[str, QuantizedLinear]:
    """GPTQ block by block: each block's four matrices are quantized from the inputs that the
    blocks before it, already quantized, produce (so later blocks correct for earlier
    errors). The model is not changed: each block runs as a copy."""
    from tqdm import tqdm

    new = {}
    x, rope, mask = block_inputs(model, calibration)
    for i, layer in enumerate(tqdm(model.layers, desc=f"GPTQ {fmt.name}", unit="block", disable=None, leave=False)):
        inputs = {}
        hooks = [module.register_forward_pre_hook(
                     lambda _m, args, key=key: inputs.setdefault(key, []).append(args[0].detach()))
                 for key, module in (("attn.wqkv", layer.attn.wqkv), ("attn.wo", layer.attn.wo),
                                     ("mlp.w13", layer.mlp.w13), ("mlp.w2", layer.mlp.w2))]
        try:
            layer(x, rope, 0, mask)
        finally:
            for h in hooks:
                h.remove()
        quantized = copy.deepcopy(layer)
        for key, xs in inputs.items():
            linear = layer.get_submodule(key)
            qt = gptq_quantize(linear.weight, hessian(torch.cat(xs)), fmt.bits, fmt.group, fmt.symmetric)
            new[f"layers.{i}.{key}"] = QuantizedLinear.from_quantized(qt, linear.bias)
            quantized.get_submodule(key).weight = torch.nn.Parameter(qt.dequantize(), requires_grad=False)
        x = quantized(x, rope, 0, mask)
    return new
