"""`load_model()`: a GGUF file in, a ready model and tokenizer out."""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from .errors import DojoError
from .gguf_loader import (
    config_from_gguf,
    default_model_path,
    open_gguf,
    raw_blocks_from_gguf,
    state_dict_from_gguf,
)
from .model import Transformer
from .tokenizer import Tokenizer

# Config fields a caller may change at load time: how positions are encoded and attention
# computed. Everything else is a fact of the file (changing it would not fit the weights).
LOAD_OVERRIDES = ("attn_impl", "kv_cache", "kv_block_size", "max_seq_len", "rope_base", "rope_layout", "rope_scaling",
                  "rope_scaling_factor")


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu", pack: bool = True, quantize: str | None = None,
               kernels: str = "auto", **config_overrides) -> tuple[Transformer, Tokenizer]:
    """Load a Llama-architecture GGUF file; the default is SmolLM2-135M-Instruct.

    pack: on the CPU in float32, also keep packed copies of the weights for fast
    decoding (`Transformer.pack_for_cpu`; doubles the memory of the weights). With
    quantize=, the codes are repacked for the compiled integer matmul and the activations
    of those layers are quantized to int8 per block of 32 (its arithmetic, with or without
    the compiled kernels); pack=False keeps the quantized model weight-only.
    quantize: a format of `compression.quantize.FORMATS` ("q4_1", "int8", "int4-g32",
        "w8a8", "bf16", ...); "q4_1" keeps the file's own Q4_1 and Q8_0 bytes.
    device, dtype: where and in what precision the weights live, e.g. device="cuda",
        dtype=torch.bfloat16 (or "bfloat16"); a device that is absent or a dtype it cannot
        compute in is refused with a DojoError.
    kernels: "torch", "triton" (RMSNorm, RoPE and attention run as the Triton kernels of
        `kernels/`; on a CPU in Triton's interpreter, slowly) or "auto": triton on a GPU
        when triton is installed, torch otherwise.
    config_overrides: any of LOAD_OVERRIDES, e.g. rope_layout="adjacent", or
        rope_scaling="ntk", rope_scaling_factor=2.0, max_seq_len=16384.

    Example:
        model, tokenizer = load_model()
        logits = model(torch.tensor([tokenizer.encode("Hello")]))  # (1, T, 49152) float32
    """
    device, dtype = check_device(device, dtype)
    if kernels not in KERNELS:
        raise DojoError(f"unknown kernels {kernels!r}; choose one of {', '.join(KERNELS)}")
    if kernels == "triton":
        from .kernels import interpreted

        if interpreted() and dtype == torch.bfloat16:  # interpreted() imports triton: missing, said now
            raise DojoError("Triton's interpreter computes bfloat16 tl.dot wrongly (it multiplies the raw bits): "
                            "--kernels triton on a CPU needs --dtype float32 or float16")
    if quantize is not None and device.type != "cpu":
        raise DojoError(f"quantized formats run on the CPU (chapter 4's kernels); --quantize with --device "
                        f"{device} is not supported: drop --quantize (use --dtype bfloat16) or run on the CPU")
    wrong = sorted(set(config_overrides) - set(LOAD_OVERRIDES))
    if wrong:
        raise DojoError(f"load_model cannot override {', '.join(wrong)}: those are read from the file. "
                        f"It can override {', '.join(LOAD_OVERRIDES)}.")
    fmt = None
    if quantize is not None:
        from .compression.quantize import parse_format

        fmt = parse_format(quantize)  # an unknown name fails here, before the slow part
    reader = open_gguf(path if path is not None else default_model_path())
    config = replace(config_from_gguf(reader), **config_overrides)
    tokenizer = Tokenizer.from_gguf(reader)
    model = model_from_state_dict(config, state_dict_from_gguf(reader, config))
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if fmt is not None:
        from .compression.quantize import quantize_model

        raw = raw_blocks_from_gguf(reader, config) if fmt.kind == "blocks" else None
        quantize_model(model, fmt, tokenizer=tokenizer, raw_blocks=raw)
    if pack:
        model.pack_for_cpu()
    if kernels == "triton" or (kernels == "auto" and device.type == "cuda" and triton_installed()):
        model.set_kernels("triton")
    return model, tokenizer


KERNELS = ("auto", "torch", "triton")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}  # float64: the graders' references


def check_device(device: str | torch.device, dtype: torch.dtype | str) -> tuple[torch.device, torch.dtype]:
    """The device and dtype as torch objects, or a DojoError saying what is missing: an
    unknown name, a CUDA device on a machine without one, a dtype the device cannot
    compute in (bfloat16 on a GPU older than Ampere)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise DojoError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise DojoError(f"unknown device {device!r}; use cpu or cuda (cuda:1 for the second GPU)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise DojoError(f"--device {device}: no CUDA GPU is visible to PyTorch (torch {torch.__version__}, "
                            f"{build}); run on the CPU (--device cpu) or on a machine with an NVIDIA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DojoError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
        if dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
            raise DojoError(f"{torch.cuda.get_device_name(device)} cannot compute in bfloat16 (it needs compute "
                            "capability 8.0 or later); use --dtype float16 or float32")
    elif device.type != "cpu":
        raise DojoError(f"unsupported device {device}; the engine runs on cpu or cuda")
    if dtype not in DTYPES.values():
        raise DojoError(f"unsupported dtype {dtype}; choose one of {', '.join(DTYPES)}")
    return device, dtype


def triton_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Only the tokenizer of a GGUF file (no weights are read)."""
    return Tokenizer.from_gguf(open_gguf(path if path is not None else default_model_path()))


def model_from_state_dict(config, state_dict: dict[str, torch.Tensor]) -> Transformer:
    """Build the model around existing tensors, skipping random initialisation."""
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(state_dict, assign=True, strict=True)
    model.make_position_tables()  # non-persistent buffers were created on meta
    return model
