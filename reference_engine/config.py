"""Model hyperparameters: one dataclass, plus named presets.

Two families share one code path in `model.py`:
  - Llama family (SmolLM2): RMSNorm, RoPE, grouped-query attention, SwiGLU, tied embeddings.
  - GPT-2 family: LayerNorm, learned absolute positions, GELU MLP, multi-head attention.
Any of the positional encodings of `positional.py` can be chosen with `pos_encoding`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .errors import DojoError
from .positional import ROPE_LAYOUTS, ROPE_SCALINGS

POS_ENCODINGS = ("rope", "learned", "sinusoidal", "alibi")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 49152  # rows of the embedding table (and of the tied LM head)
    d_model: int = 576  # width of the residual stream
    n_layers: int = 30  # number of transformer blocks
    n_heads: int = 9  # query heads
    n_kv_heads: int = 3  # < n_heads means grouped-query attention: K/V shared by groups
    head_dim: int = 64  # width of one head; n_heads * head_dim need not equal d_model
    ffn_dim: int = 1536  # hidden width of the MLP
    max_seq_len: int = 8192  # trained context length; the KV cache is sized from it
    norm: str = "rmsnorm"  # "rmsnorm" (Llama) or "layernorm" (GPT-2)
    norm_eps: float = 1e-5  # added to the variance inside the norm
    pos_encoding: str = "rope"  # "rope" (Llama), "learned" (GPT-2), "sinusoidal" (fixed table), "alibi" (score bias)
    rope_base: float = 100000.0  # theta in RoPE: frequency_i = base^(-2i / head_dim)
    rope_layout: str = "half"  # RoPE pairs: "half" (i with i + D/2) or "adjacent" (2i with 2i+1, as in GGUF)
    rope_scaling: str = "none"  # past the trained length: "linear" (position interpolation) or "ntk" (larger base)
    rope_scaling_factor: float = 1.0  # how many times the trained length the scaling should cover
    mlp: str = "swiglu"  # "swiglu": down(silu(gate(x)) * up(x)); "gelu": down(gelu(up(x)))
    bias: bool = False  # biases on the linear layers (GPT-2 has them, Llama does not)
    tie_embeddings: bool = True  # LM head reuses the token embedding matrix
    kv_cache: str = "static"  # "static" (preallocated, batch x max_seq_len) or "paged" (blocks taken as needed)
    kv_block_size: int = 16  # slots per block of the paged cache
    attn_impl: str = "sdpa"  # "sdpa" (PyTorch's fused kernel), "math" (the formula), "tiled" (online softmax)

    def __post_init__(self):
        if self.norm not in ("rmsnorm", "layernorm"):
            raise DojoError(f"norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")
        if self.pos_encoding not in POS_ENCODINGS:
            raise DojoError(f"pos_encoding must be one of {POS_ENCODINGS}, got {self.pos_encoding!r}")
        if self.rope_layout not in ROPE_LAYOUTS:
            raise DojoError(f"rope_layout must be one of {ROPE_LAYOUTS}, got {self.rope_layout!r}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise DojoError(f"rope_scaling must be one of {ROPE_SCALINGS}, got {self.rope_scaling!r}")
        if not self.rope_scaling_factor >= 1.0:
            raise DojoError(f"rope_scaling_factor must be at least 1 (1 = no scaling), got {self.rope_scaling_factor}")
        if self.pos_encoding == "sinusoidal" and self.d_model % 2 != 0:
            raise DojoError(f"the sinusoidal table pairs sin and cos, so d_model must be even, got {self.d_model}")
        if self.mlp not in ("swiglu", "gelu"):
            raise DojoError(f"mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        if self.attn_impl not in ("sdpa", "math", "tiled"):
            raise DojoError(f"attn_impl must be 'sdpa', 'math' or 'tiled', got {self.attn_impl!r}")
        if self.kv_cache not in ("static", "paged") or self.kv_block_size < 1:
            raise DojoError(f"kv_cache must be 'static' or 'paged' with kv_block_size >= 1, got "
                            f"{self.kv_cache!r} and {self.kv_block_size}")
        if self.n_heads % self.n_kv_heads != 0:
            raise DojoError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.pos_encoding == "rope" and self.head_dim % 2 != 0:
            raise DojoError(f"RoPE rotates pairs, so head_dim must be even, got {self.head_dim}")

    @property
    def group_size(self) -> int:
        """Query heads that share one K/V head (1 = multi-head, n_heads = multi-query)."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        """ModelConfig.from_name("tiny", n_layers=3) -> the tiny preset with 3 layers."""
        if name not in PRESETS:
            raise DojoError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


PRESETS = {
    "smollm2-135m": ModelConfig(),
    # Tiny configs for unit tests: same code paths, milliseconds per forward.
    "tiny": ModelConfig(
        vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
        ffn_dim=128, max_seq_len=128, rope_base=10000.0,
    ),
    "tiny-mha": ModelConfig(
        vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16,
        ffn_dim=128, max_seq_len=128, rope_base=10000.0,
    ),
    "tiny-gpt2": ModelConfig(
        vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16,
        ffn_dim=256, max_seq_len=128, norm="layernorm", pos_encoding="learned", mlp="gelu",
        bias=True,
    ),
    # Chapter 2's encodings on the same tiny shapes. ALiBi with 6 heads (not a power of two)
    # and 2 K/V heads exercises the per-head bias inside grouped-query decoding.
    "tiny-alibi": ModelConfig(
        vocab_size=300, d_model=64, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=16,
        ffn_dim=128, max_seq_len=128, pos_encoding="alibi",
    ),
    "tiny-sinusoidal": ModelConfig(
        vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16,
        ffn_dim=256, max_seq_len=128, norm="layernorm", pos_encoding="sinusoidal", mlp="gelu",
        bias=True,
    ),
}
