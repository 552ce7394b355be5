"""Inference Dojo's reference engine: a readable PyTorch inference engine for Llama-family
models (SmolLM2-135M-Instruct by default), loaded from GGUF files."""

from .config import ModelConfig
from .errors import DojoError
from .load import load_model, load_tokenizer
from .model import Transformer
from .tokenizer import Tokenizer

__all__ = ["DojoError", "ModelConfig", "Tokenizer", "Transformer", "load_model", "load_tokenizer"]
