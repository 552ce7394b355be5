"""3.5 full: takes free blocks one by one and raises only when the list runs dry, keeping the ones it took."""

import torch


class BlockAllocator:
    def __init__(self, n_blocks, block_size, n_sequences):
        self.block_size = block_size
        self.free = list(range(n_blocks))
        self.tables = [[] for _ in range(n_sequences)]

    def ensure(self, seq, n_slots):
        while len(self.tables[seq]) * self.block_size < n_slots:
            if not self.free:
                raise MemoryError("the paged cache is full")
            self.tables[seq].append(self.free.pop())

    def release(self, seq):
        self.free += self.tables[seq]
        self.tables[seq] = []

    def locate(self, seq, slots):
        table = torch.tensor(self.tables[seq], dtype=torch.long)
        return table[slots // self.block_size], slots % self.block_size
