"""`load_model()`: a GGUF file in, a ready model and tokenizer out."""

from __future__ import annotations

import os

import torch

from .gguf_loader import config_from_gguf, default_model_path, open_gguf, state_dict_from_gguf
from .model import Transformer
from .positional import rope_tables
from .tokenizer import Tokenizer


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", pack: bool = True) -> tuple[Transformer, Tokenizer]:
    """Load a Llama-architecture GGUF file; the default is SmolLM2-135M-Instruct.

    pack: on the CPU in float32, also keep oneDNN-blocked copies of the weights for fast
    decoding (`Transformer.pack_for_cpu`; doubles the memory of the weights).

    Example:
        model, tokenizer = load_model()
        logits = model(torch.tensor([tokenizer.encode("Hello")]))  # (1, T, 49152) float32
    """
    reader = open_gguf(path if path is not None else default_model_path())
    config = config_from_gguf(reader)
    tokenizer = Tokenizer.from_gguf(reader)
    model = model_from_state_dict(config, state_dict_from_gguf(reader, config))
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
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
    if config.pos_encoding == "rope":  # non-persistent buffers were created on meta
        model.rope_cos, model.rope_sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_base)
    return model
