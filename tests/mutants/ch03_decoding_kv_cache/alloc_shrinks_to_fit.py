"""3.5 tables: asked for fewer slots than it holds, gives the extra blocks back, though their slots are still in use."""

import math

import torch


class BlockAllocator:
    def __init__(self, n_blocks, block_size, n_sequences):
        self.block_size = block_size
        self.free = list(range(n_blocks))
        self.tables = [[] for _ in range(n_sequences)]

    def ensure(self, seq, n_slots):
        table = self.tables[seq]
        needed = math.ceil(n_slots / self.block_size) - len(table)
        if needed > len(self.free):
            raise MemoryError("the paged cache is full")
        for _ in range(needed):
            table.append(self.free.pop())
        while needed < 0:  # hold exactly what is asked for
            self.free.append(table.pop())
            needed += 1

    def release(self, seq):
        self.free += self.tables[seq]
        self.tables[seq] = []

    def locate(self, seq, slots):
        table = torch.tensor(self.tables[seq], dtype=torch.long)
        return table[slots // self.block_size], slots % self.block_size
