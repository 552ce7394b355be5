"""Published model configurations and accelerator figures that estimate templates draw
their inputs from: an estimate asked about SmolLM2-135M is asked again about Llama 3.1 8B
or on an H100, so the learner practises the method rather than remembering one number.

Figures are the vendors' and model cards' published ones (dense, no sparsity).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PublishedModel:
    label: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int  # SwiGLU hidden width: gate, up and down are d_model x ffn_dim each
    max_seq_len: int
    tie_embeddings: bool

    @property
    def attn_params(self) -> int:
        """Q and O are d x (H * hd); K and V are d x (KV * hd)."""
        return self.d_model * (self.n_heads + 2 * self.n_kv_heads) * self.head_dim + \
            self.n_heads * self.head_dim * self.d_model

    @property
    def mlp_params(self) -> int:
        return 3 * self.d_model * self.ffn_dim

    @property
    def block_params(self) -> int:
        """One transformer block: attention, MLP and its two RMSNorm weight vectors."""
        return self.attn_params + self.mlp_params + 2 * self.d_model

    @property
    def embed_params(self) -> int:
        return self.vocab_size * self.d_model

    @property
    def params(self) -> int:
        """Every weight: embeddings (twice when the LM head is not tied), blocks, final norm."""
        heads = 1 if self.tie_embeddings else 2
        return heads * self.embed_params + self.n_layers * self.block_params + self.d_model

    @property
    def kv_per_token(self) -> int:
        """Numbers cached per token: K and V, every layer, every K/V head."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads


MODELS = {
    "smollm2-135m": PublishedModel("SmolLM2-135M", 49152, 576, 30, 9, 3, 64, 1536, 8192, True),
    "smollm2-360m": PublishedModel("SmolLM2-360M", 49152, 960, 32, 15, 5, 64, 2560, 8192, True),
    "smollm2-1.7b": PublishedModel("SmolLM2-1.7B", 49152, 2048, 24, 32, 32, 64, 8192, 8192, True),
    "llama-3.1-8b": PublishedModel("Llama 3.1 8B", 128256, 4096, 32, 32, 8, 128, 14336, 131072, False),
    "llama-3.1-70b": PublishedModel("Llama 3.1 70B", 128256, 8192, 80, 64, 8, 128, 28672, 131072, False),
    "qwen2.5-7b": PublishedModel("Qwen2.5 7B", 152064, 3584, 28, 28, 4, 128, 18944, 131072, False),
    "mistral-7b": PublishedModel("Mistral 7B v0.1", 32000, 4096, 32, 32, 8, 128, 14336, 32768, False),
}


@dataclass(frozen=True)
class PublishedGPU:
    label: str
    bandwidth_gbs: float  # memory bandwidth, GB/s (10^9 bytes per second)
    memory_gb: float  # device memory, GB
    bf16_tflops: float  # dense bf16 (or fp16) tensor-core throughput, 10^12 FLOP/s

    @property
    def ridge(self) -> float:
        """FLOPs per byte at which the roofline turns from memory- to compute-bound."""
        return self.bf16_tflops * 1e12 / (self.bandwidth_gbs * 1e9)


GPUS = {
    "h100-sxm": PublishedGPU("H100 SXM", 3350, 80, 989),
    "h200": PublishedGPU("H200", 4800, 141, 989),
    "a100-80gb": PublishedGPU("A100 80GB SXM", 2039, 80, 312),
    "l4": PublishedGPU("L4", 300, 24, 121),
    "a10": PublishedGPU("A10", 600, 24, 125),
    "t4": PublishedGPU("T4", 320, 16, 65),
    "mi300x": PublishedGPU("MI300X", 5300, 192, 1307),
}
