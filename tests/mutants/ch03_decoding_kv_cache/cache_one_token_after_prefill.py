"""3.2 chunks: after the prompt, assumes one token per call and writes only the first of a chunk."""
import torch


class KVCache:
    def __init__(self, batch_size, n_kv_heads, max_seq_len, head_dim):
        self.k = torch.zeros(batch_size, n_kv_heads, max_seq_len, head_dim)
        self.v = torch.zeros(batch_size, n_kv_heads, max_seq_len, head_dim)
        self.length = 0

    def update(self, start, k, v):
        if start == 0:  # the prompt
            self.length = k.shape[2]
            self.k[:, :, : self.length] = k
            self.v[:, :, : self.length] = v
        else:  # one decoded token
            self.k[:, :, self.length] = k[:, :, 0]
            self.v[:, :, self.length] = v[:, :, 0]
            self.length += 1
        return self.k[:, :, : start + k.shape[2]], self.v[:, :, : start + k.shape[2]]
