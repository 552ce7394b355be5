"""The collectives the parallel schemes call, counted, and a ring all-reduce by hand.

Every scheme talks through a `Comm`, which calls torch.distributed and keeps, per kind of
operation, the number of calls, the bytes this rank contributed and the time spent: the
communication bill of a scheme is read off it, per token, instead of being estimated.
"""

from __future__ import annotations

import time
from collections import Counter

import torch
import torch.distributed as dist


class Comm:
    """Counted collectives on the default process group (one per process in this package):
    per kind, the calls, the bytes of this rank's tensor in each (sent, reduced, or for
    `recv` received), and the seconds the call took (for `send`, only starting it)."""

    def __init__(self):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.calls: Counter = Counter()
        self.bytes: Counter = Counter()
        self.seconds: Counter = Counter()

    def _count(self, kind: str, tensor: torch.Tensor, t0: float) -> None:
        self.calls[kind] += 1
        self.bytes[kind] += tensor.numel() * tensor.element_size()
        self.seconds[kind] += time.perf_counter() - t0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place; every rank gets the sum."""
        t0 = time.perf_counter()
        dist.all_reduce(x)
        self._count("all_reduce", x, t0)
        return x

    def all_gather(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate every rank's x along the last dimension, rank order; rank r's part has
        sizes[r] columns. subtle: gloo gathers equal shapes only, so shorter parts are padded
        to the longest and trimmed after."""
        t0 = time.perf_counter()
        width = max(sizes)
        if x.shape[-1] < width:
            x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        self._count("all_gather", x, t0)
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)

    def send(self, x: torch.Tensor, dst: int):
        """Start sending x to rank dst; returns the request (wait() before reusing x)."""
        t0 = time.perf_counter()
        request = dist.isend(x.contiguous(), dst)
        self._count("send", x, t0)
        return request

    def recv(self, shape: tuple, src: int, dtype=torch.float32) -> torch.Tensor:
        t0 = time.perf_counter()
        x = torch.empty(shape, dtype=dtype)
        dist.recv(x, src)
        self._count("recv", x, t0)
        return x

    def all_gather_object(self, value) -> list:
        """Every rank's picklable value, by rank (bytes not counted: pickles, not tensors)."""
        t0 = time.perf_counter()
        parts: list = [None] * self.world
        dist.all_gather_object(parts, value)
        self.calls["all_gather_object"] += 1
        self.seconds["all_gather_object"] += time.perf_counter() - t0
        return parts

    def broadcast(self, x: torch.Tensor, src: int) -> torch.Tensor:
        t0 = time.perf_counter()
        dist.broadcast(x, src)
        self._count("broadcast", x, t0)
        return x

    def snapshot(self) -> tuple[Counter, Counter, Counter]:
        """The counts so far, to subtract later (`summary(since=...)`): e.g. after the prompt."""
        return Counter(self.calls), Counter(self.bytes), Counter(self.seconds)

    def summary(self, per: int = 1, since: tuple | None = None) -> dict:
        """{kind: {"calls", "bytes", "ms"}} since a snapshot (default: since the start),
        divided by `per` (tokens, steps)."""
        calls, size, seconds = since or (Counter(), Counter(), Counter())
        return {kind: {"calls": (self.calls[kind] - calls[kind]) / per, "bytes": (self.bytes[kind] - size[kind]) / per,
                       "ms": 1e3 * (self.seconds[kind] - seconds[kind]) / per}
                for kind in sorted(self.calls) if self.calls[kind] > calls[kind]}


def ring_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the ranks with 2 (p - 1) messages per rank, each 1/p of x (the ring of
    NCCL and Horovod): p - 1 steps of reduce-scatter, then p - 1 steps of all-gather.

    Rank r sends to r + 1 and receives from r - 1. In reduce-scatter step s it passes on its
    running sum of chunk (r - s) mod p and adds what arrives to chunk (r - s - 1) mod p;
    after p - 1 steps it holds the full sum of chunk (r + 1) mod p. The all-gather passes
    the finished chunks around the same ring. Each rank moves 2 (p - 1) / p of x in all,
    nearly independent of p: why rings scale. Returns a new tensor; x is unchanged.
    Example, p = 3, x = [a_r, b_r, c_r] on rank r: every rank ends with [sum a, sum b, sum c].
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    chunks = list(torch.tensor_split(x.flatten().clone(), world))  # views of one new buffer
    right, left = (rank + 1) % world, (rank - 1) % world
    for phase in ("reduce", "gather"):
        for step in range(world - 1):
            send_i = (rank - step + (1 if phase == "gather" else 0)) % world
            recv_i = (rank - step - 1 + (1 if phase == "gather" else 0)) % world
            incoming = torch.empty_like(chunks[recv_i])
            request = dist.isend(chunks[send_i].contiguous(), right)
            dist.recv(incoming, left)
            request.wait()
            if phase == "reduce":
                chunks[recv_i] += incoming
            else:
                chunks[recv_i].copy_(incoming)
    return torch.cat(chunks).view_as(x)


def time_all_reduce(numels: list[int], repeats: int = 50) -> dict[int, float]:
    """Median seconds of one all_reduce of float32 tensors of each size, on this group."""
    times = {}
    for n in numels:
        x = torch.ones(n)
        samples = []
        for _ in range(repeats + 5):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            samples.append(time.perf_counter() - t0)
        times[n] = sorted(samples[5:])[len(samples[5:]) // 2]
    return times
