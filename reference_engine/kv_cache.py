"""KV caches: the static, preallocated one, and a paged one (fixed-size blocks, as in vLLM).

Decoding one token needs the keys and values of every earlier token. Recomputing them
costs a full forward over the prefix per step (quadratic work); caching them makes each
step cost one token's worth of matmuls plus one read of the cache.

Both caches have the same interface, so the model uses either (`Transformer.setup_cache`):
    update(start, k, v) -> (keys, values) of slots [0, start + T), shape (B, KV, start+T, D)
    reorder(rows)       -> keep/duplicate batch rows (beam search)

  - `KVCache` allocates batch x max_seq_len slots up front: decoding never reallocates,
    and `update` returns views. Memory is reserved for the longest possible sequence.
  - `PagedKVCache` stores keys and values in a pool of blocks of `block_size` slots; each
    sequence owns a list of blocks (its block table), taken from a free list as it grows.
    Memory follows the tokens actually written, in steps of one block, and sequences of
    very different lengths share one pool. A paged-attention kernel reads the blocks in
    place (the serving engine's, `csrc/paged_attention.cpp`); this readable version gathers
    them into one tensor per step, which costs a copy.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import DojoError


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
        """Write k, v of shape (B, n_kv_heads, T, D) into slots [start, start+T) of the first
        B rows (B may be smaller than the cache's batch: beam search prefills one row).

        Returns the keys and values of slots [0, start+T), shape (B, n_kv_heads, start+T, D):
        views into the cache, no copy.
        """
        B, end = k.shape[0], start + k.shape[2]
        self.k_cache[:B, :, start:end] = k
        self.v_cache[:B, :, start:end] = v
        return self.k_cache[:B, :, :end], self.v_cache[:B, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Batch row i becomes old row rows[i] (rows may repeat: beam search copies beams)."""
        self.k_cache = self.k_cache.index_select(0, rows)
        self.v_cache = self.v_cache.index_select(0, rows)


KV_BLOCK = 32  # values per int8 scale in `Int8KVCache`


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys or values (..., D) -> int8 codes (..., D) and float32 scales (..., D / 32), one
    per block of 32 values, as GGUF's Q8_0: scale = max|x| / 127 over the block, code =
    round(x / scale) (half to even; 0 where the block is 0). Each value is off by at most
    scale / 2, 1/254 of its block's largest. (One scale per head of 64 cost SmolLM2 four
    times the KL: its keys have a few large channels, which the other channels' codes then
    share a scale with.)"""
    blocks = x.float().unflatten(-1, (-1, KV_BLOCK))
    scale = blocks.abs().amax(-1) / 127
    codes = torch.where(scale[..., None] > 0, blocks / scale[..., None], torch.zeros_like(blocks))
    return torch.round(codes).to(torch.int8).flatten(-2), scale


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes x scale, float32 (`quantize_kv`'s inverse up to its rounding)."""
    return (codes.float().unflatten(-1, (-1, KV_BLOCK)) * scale[..., None]).flatten(-2)


def int8_scale_shape(*rows: int, head_dim: int) -> tuple[int, ...]:
    """The shape of the float32 scales of int8 codes (*rows, head_dim): one per KV_BLOCK
    values of a head. Heads that are not whole blocks are refused (both int8 stores: this
    module's cache and the serving pool)."""
    if head_dim % KV_BLOCK:
        raise DojoError(f"the int8 KV cache needs heads of a multiple of {KV_BLOCK} values; this model's "
                        f"have {head_dim}: store a float type instead (--kv-dtype float16, or set_kv_dtype)")
    return (*rows, head_dim // KV_BLOCK)


class Int8KVCache(KVCache):
    """A static cache of int8 codes with a float32 scale per block of 32 values (`quantize_kv`):
    72 bytes per head of 64 values where float32 takes 256 and float16 128, so a decode step
    that reads the whole cache at every token (batch 16, long prompts) reads 28% of
    float32's bytes. `Transformer.set_kv_dtype("int8")` selects it. `update` returns the
    dequantized keys and values (float32), a copy per step; the compiled decode step reads
    the codes in place."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 device: torch.device | str = "cpu"):
        scales = int8_scale_shape(batch_size, n_kv_heads, max_seq_len, head_dim=head_dim)
        super().__init__(batch_size, n_kv_heads, max_seq_len, head_dim, dtype=torch.int8, device=device)
        self.register_buffer("k_scale", torch.zeros(scales, device=device), persistent=False)
        self.register_buffer("v_scale", torch.zeros(scales, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, end = k.shape[0], start + k.shape[2]
        self.k_cache[:B, :, start:end], self.k_scale[:B, :, start:end] = quantize_kv(k)
        self.v_cache[:B, :, start:end], self.v_scale[:B, :, start:end] = quantize_kv(v)
        return (dequantize_kv(self.k_cache[:B, :, :end], self.k_scale[:B, :, :end]),
                dequantize_kv(self.v_cache[:B, :, :end], self.v_scale[:B, :, :end]))

    def reorder(self, rows: torch.Tensor) -> None:
        super().reorder(rows)
        self.k_scale = self.k_scale.index_select(0, rows)
        self.v_scale = self.v_scale.index_select(0, rows)


class BlockAllocator:
    """Hands out fixed-size blocks of a shared pool and keeps each sequence's block table.

    Example (block_size 4, 3 blocks): a sequence growing to 6 tokens holds 2 blocks, e.g.
    table [0, 1]; slot 5 lives in block 1 at offset 1. Freeing the sequence returns both.
    """

    def __init__(self, n_blocks: int, block_size: int, n_sequences: int):
        self.block_size = block_size
        self.free = list(range(n_blocks - 1, -1, -1))  # a stack: the lowest id is handed out first
        self.tables: list[list[int]] = [[] for _ in range(n_sequences)]

    def ensure(self, seq: int, n_slots: int) -> None:
        """Give sequence `seq` enough blocks to hold n_slots slots (ceil(n_slots / block_size))."""
        table = self.tables[seq]
        needed = -(-n_slots // self.block_size) - len(table)
        if needed > len(self.free):
            raise DojoError(f"the paged KV cache is full: sequence {seq} needs {needed} more block(s) of "
                            f"{self.block_size} slots and {len(self.free)} are free; set up the cache with "
                            "more blocks (or a shorter max_seq_len)")
        for _ in range(needed):
            table.append(self.free.pop())

    def release(self, seq: int) -> None:
        self.free.extend(reversed(self.tables[seq]))
        self.tables[seq] = []

    def locate(self, seq: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block id, offset in block) of each slot of sequence `seq`."""
        table = torch.tensor(self.tables[seq], dtype=torch.long)
        return table[slots // self.block_size], slots % self.block_size

    def reorder(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """New sequence i is a copy of old sequence rows[i] (beam search). Returns the block
        ids to copy from and to, for every layer's `PagedKVCache.copy_blocks`."""
        old = [list(t) for t in self.tables]
        src = [block for r in rows for block in old[r]]
        for seq in range(len(old)):
            self.release(seq)
        self.tables = [[] for _ in rows]
        for seq, r in enumerate(rows):
            self.ensure(seq, len(old[r]) * self.block_size)
        dst = [block for table in self.tables for block in table]
        return torch.tensor(src, dtype=torch.long), torch.tensor(dst, dtype=torch.long)

    @property
    def blocks_in_use(self) -> int:
        return sum(len(t) for t in self.tables)


class PagedKVCache(nn.Module):
    """Keys and values of one attention layer in a pool of blocks:
    pool shape (n_blocks, n_kv_heads, block_size, head_dim). The block tables live in a
    `BlockAllocator` shared by every layer (they all hold the same slots)."""

    def __init__(self, allocator: BlockAllocator, n_blocks: int, n_kv_heads: int, head_dim: int,
                 max_seq_len: int, block_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.allocator = allocator  # used only through ensure, locate and (beam search) reorder
        self.max_seq_len = max_seq_len
        shape = (n_blocks, n_kv_heads, block_size, head_dim)
        self.register_buffer("k_pool", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_pool", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Same contract as `KVCache.update`; the returned tensors are gathered copies."""
        B, end = k.shape[0], start + k.shape[2]
        keys, values = [], []
        for b in range(B):
            self.allocator.ensure(b, end)  # a no-op in every layer after the first
            block, offset = self.allocator.locate(b, torch.arange(end))  # (end,) each: where every slot lives
            new = slice(start, end)
            # (T, KV, D) into T cells, in the pool's dtype (a 16-bit pool: `Transformer.set_kv_dtype`)
            self.k_pool[block[new], :, offset[new]] = k[b].transpose(0, 1).to(self.k_pool.dtype)
            self.v_pool[block[new], :, offset[new]] = v[b].transpose(0, 1).to(self.v_pool.dtype)
            keys.append(self.k_pool[block, :, offset].transpose(0, 1))  # gathered: (KV, end, D)
            values.append(self.v_pool[block, :, offset].transpose(0, 1))
        return torch.stack(keys), torch.stack(values)  # (B, KV, end, D)

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """pool[dst] = pool[src]: the data movement of `BlockAllocator.reorder`."""
        self.k_pool[dst] = self.k_pool[src]  # the right side is gathered first, so overlap is safe
        self.v_pool[dst] = self.v_pool[src]
