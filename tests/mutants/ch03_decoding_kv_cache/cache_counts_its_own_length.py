"""3.2 chunks: writes at a length it counts itself instead of at `start` (right until a speculative draft is rejected)."""
import torch


class KVCache:
    def __init__(self, batch_size, n_kv_heads, max_seq_len, head_dim):
        self.k = torch.zeros(batch_size, n_kv_heads, max_seq_len, head_dim)
        self.v = torch.zeros(batch_size, n_kv_heads, max_seq_len, head_dim)
        self.length = 0

    def update(self, start, k, v):
        end = self.length + k.shape[2]
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]
