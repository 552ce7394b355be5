"""Static, preallocated KV cache.

Decoding one token needs the keys and values of every earlier token. Recomputing them
costs a full forward over the prefix per step (quadratic work); caching them makes each
step cost one token's worth of matmuls plus one read of the cache.

The cache is allocated once, at its full size, so decoding never reallocates or copies:
`update` writes new rows in place and returns views of the filled prefix.
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Keys and values of one attention layer, shape (batch, n_kv_heads, max_seq_len, head_dim).

    Slots are shared by the batch: slot s holds the s-th token fed to the model, whatever
    its RoPE position (left-padded prompts start their real tokens at different slots).
    """

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k_cache.shape[2]

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v of shape (B, n_kv_heads, T, D) into slots [start, start+T).

        Returns the keys and values of slots [0, start+T), shape (B, n_kv_heads, start+T, D):
        views into the cache, no copy.
        """
        end = start + k.shape[2]
        self.k_cache[:, :, start:end] = k
        self.v_cache[:, :, start:end] = v
        return self.k_cache[:, :, :end], self.v_cache[:, :, :end]
