"""3.5 tables: builds a fresh table on every ensure, so a growing sequence moves to new blocks and loses what it wrote."""
import math

import torch


class BlockAllocator:
    def __init__(self, n_blocks, block_size, n_sequences):
        self.block_size = block_size
        self.free = list(range(n_blocks))
        self.tables = [[] for _ in range(n_sequences)]

    def ensure(self, seq, n_slots):
        needed = math.ceil(n_slots / self.block_size)
        if needed > len(self.free) + len(self.tables[seq]):
            raise MemoryError("the paged cache is full")
        self.free += self.tables[seq]
        self.tables[seq] = [self.free.pop(0) for _ in range(needed)]

    def release(self, seq):
        self.free += self.tables[seq]
        self.tables[seq] = []

    def locate(self, seq, slots):
        table = torch.tensor(self.tables[seq], dtype=torch.long)
        return table[slots // self.block_size], slots % self.block_size
