"""Inference Dojo's reference engine: a readable PyTorch inference engine for Llama-family
models (SmolLM2-135M-Instruct by default), loaded from GGUF files."""

from .kernels import choose_triton_mode

choose_triton_mode()  # before anything (torch.compile among others) imports triton

from .config import ModelConfig  # noqa: E402
from .errors import DojoError  # noqa: E402
from .load import load_model, load_tokenizer  # noqa: E402
from .model import Transformer  # noqa: E402
from .tokenizer import Tokenizer  # noqa: E402

__all__ = ["DojoError", "ModelConfig", "Tokenizer", "Transformer", "load_model", "load_tokenizer"]
