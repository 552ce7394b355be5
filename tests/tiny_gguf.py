"""Build tiny Llama models and write them as GGUF files, the way llama.cpp's converter does
(Q/K rows permuted to the adjacent-pair RoPE layout, ggml axis order, quantized blocks),
so the loader is tested on files it did not write itself."""

from __future__ import annotations

from collections import Counter

import numpy as np
import regex
import torch

from reference_engine.config import ModelConfig
from reference_engine.model import Transformer
from reference_engine.tokenizer import GPT2_PATTERN, byte_alphabet

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TRAIN_TEXT = ("the cat sat on the mat. the dog ate the bone. then the cat and the dog sat together, "
              "in 2024 they were 12 and 7 years old. ") * 4


def train_bpe(text: str, vocab_size: int) -> tuple[list[str], list[str]]:
    """A minimal byte-level BPE trainer: repeatedly merge the most frequent adjacent pair
    inside words. Returns (tokens, merges) with specials first, then the 256 bytes."""
    to_unicode = byte_alphabet()
    pieces = regex.findall(GPT2_PATTERN, text)
    words = Counter(tuple(to_unicode[b] for b in piece.encode("utf-8")) for piece in pieces)
    tokens = SPECIALS + [to_unicode[b] for b in range(256)]
    merges = []
    while len(tokens) < vocab_size:
        pairs = Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        new_words = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += n
        words = new_words
    return tokens, merges


def tiny_llama(seed: int = 0, **overrides) -> Transformer:
    """A random tiny Llama-family model (float32, eval mode), weights of realistic scale."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_name("tiny", **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3 if "tok_embeddings" in name else p.shape[-1] ** -0.5)
    return model.eval()


def random_model(preset: str = "tiny", seed: int = 1, **overrides) -> Transformer:
    """A random model of a tiny preset in float64 (eval mode), so that equality checks are
    not at the mercy of float32 rounding in differently shaped matmuls."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_name(preset, **overrides)).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.5 if "embeddings" in name else p.shape[-1] ** -0.5)
    return model


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter: half-split rows -> adjacent-pair rows, per head."""
    out_features, in_features = w.shape
    return (w.reshape(n_heads, 2, out_features // n_heads // 2, in_features)
             .swapaxes(1, 2).reshape(out_features, in_features))


def write_gguf(model: Transformer, path, tensor_type: str = "F32", arch: str = "llama",
               chat_template: str | None = None, drop_tensor: str | None = None) -> dict[str, np.ndarray]:
    """Write `model` as a GGUF file. Matrices are stored as `tensor_type` (norms stay F32,
    as llama.cpp does). Returns the dequantized weights that the file holds, by GGUF name,
    in PyTorch axis order, so tests know exactly what the loader must reproduce."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    c = model.config
    tokens, merges = train_bpe(TRAIN_TEXT, c.vocab_size)
    assert len(tokens) == c.vocab_size, "tiny vocabulary could not be filled"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.block_count", c.n_layers)
    writer.add_uint32(f"{arch}.context_length", c.max_seq_len)
    writer.add_uint32(f"{arch}.embedding_length", c.d_model)
    writer.add_uint32(f"{arch}.feed_forward_length", c.ffn_dim)
    writer.add_uint32(f"{arch}.attention.head_count", c.n_heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", c.n_kv_heads)
    writer.add_float32(f"{arch}.rope.freq_base", c.rope_base)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.norm_eps)
    writer.add_uint32(f"{arch}.rope.dimension_count", c.head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(merges)
    writer.add_eos_token_id(2)
    if chat_template:
        writer.add_chat_template(chat_template)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    q_rows, kv_rows = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    named = {"token_embd.weight": sd["tok_embeddings.weight"], "output_norm.weight": sd["norm.weight"]}
    for i in range(c.n_layers):
        p = f"layers.{i}."
        q, k, v = np.split(sd[p + "attn.wqkv.weight"], [q_rows, q_rows + kv_rows])
        gate, up = np.split(sd[p + "mlp.w13.weight"], 2)
        named.update({
            f"blk.{i}.attn_q.weight": permute_rope_rows(q, c.n_heads),
            f"blk.{i}.attn_k.weight": permute_rope_rows(k, c.n_kv_heads),
            f"blk.{i}.attn_v.weight": v, f"blk.{i}.attn_output.weight": sd[p + "attn.wo.weight"],
            f"blk.{i}.ffn_gate.weight": gate, f"blk.{i}.ffn_up.weight": up,
            f"blk.{i}.ffn_down.weight": sd[p + "mlp.w2.weight"],
            f"blk.{i}.attn_norm.weight": sd[p + "attn_norm.weight"],
            f"blk.{i}.ffn_norm.weight": sd[p + "ffn_norm.weight"],
        })
    stored = {}
    for name, array in named.items():
        if name == drop_tensor:
            continue
        kind = Q.F32 if array.ndim == 1 else Q[tensor_type]
        data = gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), kind)
        writer.add_tensor(name, data, raw_dtype=kind)
        stored[name] = gguf.quants.dequantize(data, kind).reshape(array.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored
