"""`save_gguf()`: a model and its tokenizer written as a Llama-architecture GGUF file that
`load_model(path)` (and llama.cpp) reads: how a pruned, smaller SmolLM2 is kept.

The inverse of `gguf_loader.py`: the config becomes `llama.*` metadata, the tokenizer its
`tokenizer.ggml.*` keys, and the fused matrices are split back into GGUF's tensors
(attn_q/k/v, ffn_gate/up) with the Q and K rows returned to the adjacent-pair layout that
GGUF files use. Weights are written as F32 (quantize at load time: `load_model(path,
quantize="q4_1")`). The file is written next to its destination and moved into place at
the end, so a failure never leaves half a file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .errors import DojoError
from .positional import half_to_adjacent_rows

CONTROL, NORMAL = 3, 1  # GGUF token types


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 array, in PyTorch axis order (out, in)."""
    c = model.config
    if (c.norm, c.pos_encoding, c.mlp, c.bias) != ("rmsnorm", "rope", "swiglu", False):
        raise DojoError("save_gguf writes Llama-family models (RMSNorm, RoPE, SwiGLU, no biases)")
    from .model import Linear

    odd = [name for name, m in model.layers.named_modules(prefix="layers")
           if name.rsplit(".", 1)[-1] in ("wqkv", "wo", "w13", "w2") and type(m) is not Linear]
    if "lm_head" in model._modules and type(model.lm_head) is not Linear:
        odd.append("lm_head")
    if odd:
        raise DojoError(f"save_gguf writes float weights; {odd[0]} is {type(model.get_submodule(odd[0])).__name__}: "
                        "save before quantizing or factorising (quantize when loading: load_model(path, quantize=...))")
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    q_rows, kv_rows = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    out = {"token_embd.weight": sd["tok_embeddings.weight"], "output_norm.weight": sd["norm.weight"]}
    if "lm_head.weight" in sd:  # an untied head; without it the loader ties the head to the embedding
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(c.n_layers):
        p = f"layers.{i}."
        q, k, v = torch.split(sd[p + "attn.wqkv.weight"], [q_rows, kv_rows, kv_rows])
        if c.rope_layout == "half":  # GGUF keeps RoPE pairs adjacent
            q, k = half_to_adjacent_rows(q, c.n_heads), half_to_adjacent_rows(k, c.n_kv_heads)
        gate, up = sd[p + "mlp.w13.weight"].chunk(2)
        out.update({f"blk.{i}.attn_q.weight": q, f"blk.{i}.attn_k.weight": k, f"blk.{i}.attn_v.weight": v,
                    f"blk.{i}.attn_output.weight": sd[p + "attn.wo.weight"], f"blk.{i}.ffn_gate.weight": gate,
                    f"blk.{i}.ffn_up.weight": up, f"blk.{i}.ffn_down.weight": sd[p + "mlp.w2.weight"],
                    f"blk.{i}.attn_norm.weight": sd[p + "attn_norm.weight"],
                    f"blk.{i}.ffn_norm.weight": sd[p + "ffn_norm.weight"]})
    return {name: np.ascontiguousarray(t.numpy(), dtype=np.float32) for name, t in out.items()}


def save_gguf(model, tokenizer, path: str | os.PathLike, name: str = "pruned") -> Path:
    """Write model and tokenizer to `path` (a .gguf file); returns the path."""
    import gguf

    c = model.config
    path = Path(path)
    if not path.parent.is_dir():
        raise DojoError(f"cannot write {path}: the folder {path.parent} does not exist")
    tensors = gguf_tensors(model)  # checks everything before a byte is written
    tmp = path.with_name(path.name + ".partial")
    try:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(name)
        for key, value in [("block_count", c.n_layers), ("context_length", c.max_seq_len),
                           ("embedding_length", c.d_model), ("feed_forward_length", c.ffn_dim),
                           ("attention.head_count", c.n_heads), ("attention.head_count_kv", c.n_kv_heads),
                           ("rope.dimension_count", c.head_dim), ("attention.key_length", c.head_dim),
                           ("attention.value_length", c.head_dim)]:  # d_model / n_heads no longer is, once heads go
            writer.add_uint32(f"llama.{key}", value)
        writer.add_float32("llama.rope.freq_base", c.rope_base)
        writer.add_float32("llama.attention.layer_norm_rms_epsilon", c.norm_eps)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tokenizer.pre)
        writer.add_token_list(tokenizer.tokens)
        writer.add_token_types([CONTROL if i in tokenizer.special_ids else NORMAL for i in range(tokenizer.vocab_size)])
        writer.add_token_merges(tokenizer.merges)
        if tokenizer.eos_id is not None:
            writer.add_eos_token_id(tokenizer.eos_id)
        writer.add_chat_template(tokenizer.chat_template)
        for tensor_name, array in tensors.items():
            writer.add_tensor(tensor_name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
