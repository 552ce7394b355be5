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


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", pack: bool = True, quantize: str | None = None,
               **config_overrides) -> tuple[Transformer, Tokenizer]:
    """Load a Llama-architecture GGUF file; the default is SmolLM2-135M-Instruct.

    pack: on the CPU in float32, also keep packed copies of the weights for fast
    decoding (`Transformer.pack_for_cpu`; doubles the memory of the weights). With
    quantize=, the codes are repacked for the compiled integer matmul and the activations
    of those layers are quantized to int8 per block of 32 (its arithmetic, with or without
    the compiled kernels); pack=False keeps the quantized model weight-only.
    quantize: a format of `compression.quantize.FORMATS` ("q4_1", "int8", "int4-g32",
        "w8a8", "bf16", ...); "q4_1" keeps the file's own Q4_1 and Q8_0 bytes.
    config_overrides: any of LOAD_OVERRIDES, e.g. rope_layout="adjacent", or
        rope_scaling="ntk", rope_scaling_factor=2.0, max_seq_len=16384.

    Example:
        model, tokenizer = load_model()
        logits = model(torch.tensor([tokenizer.encode("Hello")]))  # (1, T, 49152) float32
    """
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
    return model, tokenizer


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
