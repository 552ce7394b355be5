"""Data parallel inference: every rank holds the whole model and generates for its share
of the prompts; the results are gathered back in the prompts' order.

No communication while generating, one gather at the end: throughput scales with the
ranks as long as each has the memory for a whole model and the cores (or the memory
bandwidth) to run it. It does nothing for one request's latency: a single prompt runs on
one rank while the others wait.
"""

from __future__ import annotations

from ..generate import generate
from ..model import Transformer
from .comm import Comm
from .tensor import shares


def data_parallel_generate(model: Transformer, comm: Comm, prompts: list[list[int]], max_new_tokens: int,
                           stop_ids=()) -> list[list[int]]:
    """Greedy tokens for every prompt, in the prompts' order, on every rank."""
    mine = [prompts[i] for i in shares(len(prompts), comm.world)[comm.rank]]  # contiguous, sizes differ by <= 1
    tokens = generate(model, mine, max_new_tokens=max_new_tokens, stop_ids=stop_ids).tokens if mine else []
    parts = comm.all_gather_object(tokens)  # rank order is prompt order: shares are contiguous
    return [t for part in parts for t in part]
