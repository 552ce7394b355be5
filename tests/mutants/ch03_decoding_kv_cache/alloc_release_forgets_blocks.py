"""3.5 reuse: release empties the table but never puts the blocks back on the free list."""
import math

import torch


class BlockAllocator:
    def __init__(self, n_blocks, block_size, n_sequences):
        self.block_size = block_size
        self.free = list(range(n_blocks))
        self.tables = [[] for _ in range(n_sequences)]

    def ensure(self, seq, n_slots):
        needed = math.ceil(n_slots / self.block_size) - len(self.tables[seq])
        if needed > len(self.free):
            raise MemoryError("the paged cache is full")
        for _ in range(needed):
            self.tables[seq].append(self.free.pop())

    def release(self, seq):
        self.tables[seq] = []

    def locate(self, seq, slots):
        table = torch.tensor(self.tables[seq], dtype=torch.long)
        return table[slots // self.block_size], slots % self.block_size
