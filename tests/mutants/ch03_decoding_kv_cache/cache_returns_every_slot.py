"""3.2 smollm: returns all max_seq_len slots, so attention also weighs the zeros of slots not written yet."""
import torch


class KVCache:
    def __init__(self, batch_size, n_kv_heads, max_seq_len, head_dim):
        self.k = torch.zeros(batch_size, n_kv_heads, max_seq_len, head_dim)
        self.v = torch.zeros(batch_size, n_kv_heads, max_seq_len, head_dim)

    def update(self, start, k, v):
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k, self.v
