"""Pipeline parallel inference: the blocks in stages, one stage per rank, micro-batches
flowing through them (GPipe's schedule, forward only).

Stage s holds blocks [start_s, stop_s). A batch is cut into m micro-batches; at step t of
the schedule stage s runs micro-batch t - s, then sends its activations (B_j, T, d_model)
to stage s + 1. The last stage turns them into logits and picks the next token. Each
stage is idle for p - 1 of the m + p - 1 steps of one forward (filling and draining the
pipe): the bubble, (p - 1) / (m + p - 1) of the time when stages take equal time, so
more micro-batches make it smaller (GPipe, Huang et al. 2019).

Generation adds a loop around it: every micro-batch's next token must reach stage 0
before its next forward, so each decoding step is one full schedule, fill and drain
included, and the tokens go back from the last stage by a broadcast. Each stage keeps
one KV cache per micro-batch for its own blocks only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..errors import DojoError
from ..generate import pad_left
from ..kv_cache import KVCache
from ..model import Transformer
from .comm import Comm
from .tensor import shares


def gpipe_schedule(n_stages: int, n_micro: int) -> list[list[int | None]]:
    """schedule[t][s]: the micro-batch stage s runs at step t of a forward, or None (idle).
    Example: 2 stages, 3 micro-batches -> [[0, None], [1, 0], [2, 1], [None, 2]]."""
    return [[t - s if 0 <= t - s < n_micro else None for s in range(n_stages)]
            for t in range(n_micro + n_stages - 1)]


def bubble_fraction(n_stages: int, n_micro: int) -> float:
    """The idle share of a GPipe forward when every stage takes the same time: (p - 1) / (m + p - 1)."""
    return (n_stages - 1) / (n_micro + n_stages - 1)


def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """The blocks of each stage. Example: 30 blocks, 4 stages -> 8, 8, 7, 7 blocks."""
    if not 1 <= n_stages <= n_layers:
        raise DojoError(f"pipeline parallel puts whole blocks on each stage and this model has {n_layers}: "
                        f"use 1 to {n_layers} ranks, not {n_stages}")
    return shares(n_layers, n_stages)


def keep_stage(model: Transformer, rank: int, world: int) -> range:
    """Drop every block but this stage's, in place (the embedding and head stay: stage 0
    embeds, the last stage's head makes logits, and every stage reads positions and masks)."""
    mine = stage_layers(model.config.n_layers, world)[rank]
    model.layers = nn.ModuleList(model.layers[i] for i in mine)
    return mine


@dataclass
class MicroBatch:
    """One micro-batch's prompts, padding and KV caches (this stage's blocks only)."""

    rows: range  # its rows in the whole batch
    ids: torch.Tensor  # (B_j, T) the prompt, left-padded; later the last tokens (B_j, 1)
    positions: torch.Tensor  # (B_j, T), then (B_j, 1)
    key_valid: torch.Tensor | None  # (B_j, longest + new tokens); None without padding
    longest: int
    caches: list[KVCache] = field(default_factory=list)


@dataclass
class PipelineRun:
    tokens: list[list[int]]  # generated ids per prompt (stop token excluded), the same on every rank
    after_prompt: tuple  # the Comm's counts once the prompt's step was done (`Comm.summary(since=)`)
    timeline: list[tuple[int, int, int, float, float]]  # (stage, step, micro-batch, start s, end s), all stages
    steps: int  # forwards through the pipe: the prompt, then one per new token
    seconds: float  # wall time of all the steps


def measured_bubble(timeline: list[tuple], n_stages: int) -> float:
    """1 - busy / (stages x wall), the wall of each step from its first start to its last end."""
    steps = sorted({step for _, step, *_ in timeline})
    wall = sum(max(e for _, st, _, _, e in timeline if st == step) - min(s for _, st, _, s, _ in timeline if st == step)
               for step in steps)
    busy = sum(e - s for *_, s, e in timeline)
    return 1 - busy / (n_stages * wall)


@torch.inference_mode()
def pipeline_generate(model: Transformer, comm: Comm, prompts: list[list[int]], max_new_tokens: int,
                      n_micro: int, stop_ids=()) -> PipelineRun:
    """Greedy generation through the pipe. `model` holds this stage's blocks (`keep_stage`)."""
    rank, world = comm.rank, comm.world
    if not 1 <= n_micro <= len(prompts):
        raise DojoError(f"{n_micro} micro-batches of {len(prompts)} prompts: use 1 to {len(prompts)}")
    if max_new_tokens < 1:
        raise DojoError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    c = model.config
    longest = max(len(p) for p in prompts)
    if longest >= c.max_seq_len:
        raise DojoError(f"the prompt has {longest} tokens but the model's context is {c.max_seq_len}")
    max_new_tokens = min(max_new_tokens, c.max_seq_len - longest)  # as `generate`: prompt and output fit
    micro = []
    for rows in shares(len(prompts), n_micro):
        ids, valid, positions = pad_left(prompts[rows.start:rows.stop])
        size = len(rows)
        longest = ids.shape[1]
        key_valid = None
        if not bool(valid.all()):
            key_valid = torch.ones(size, longest + max_new_tokens, dtype=torch.bool)
            key_valid[:, :longest] = valid
        caches = [KVCache(size, c.n_kv_heads, longest + max_new_tokens, c.head_dim) for _ in model.layers]
        micro.append(MicroBatch(rows, ids, positions, key_valid, longest, caches))
    stops = frozenset(stop_ids)
    tokens: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    dist.barrier()  # one start for every stage; perf_counter is the machine's monotonic clock
    timeline, t_origin = [], time.perf_counter()
    step = 0
    for step in range(max_new_tokens):
        next_tokens = torch.zeros(len(prompts), dtype=torch.long)
        pending = []
        for j in (row[rank] for row in gpipe_schedule(world, n_micro)):
            if j is None:
                continue
            mb = micro[j]
            start = 0 if step == 0 else mb.longest + step - 1
            x, rope, mask = model.embed(mb.ids, start, mb.positions, mb.key_valid)  # x used on stage 0 only
            if rank > 0:
                x = comm.recv(tuple(x.shape), rank - 1)
            t0 = time.perf_counter()
            for layer, cache in zip(model.layers, mb.caches):
                layer.attn.use_cache(cache)
                x = layer(x, rope, start, mask)
            if rank == world - 1:
                next_tokens[mb.rows.start:mb.rows.stop] = model.head(model.norm(x[:, -1:]))[:, -1].argmax(-1)
            else:
                pending.append(comm.send(x, rank + 1))
            timeline.append((rank, step, j, t0 - t_origin, time.perf_counter() - t_origin))
        for request in pending:
            request.wait()
        comm.broadcast(next_tokens, world - 1)  # every stage learns the new tokens (stage 0 embeds them)
        for row, tid in enumerate(next_tokens.tolist()):
            if not done[row]:
                if tid in stops:
                    done[row] = True
                else:
                    tokens[row].append(tid)
        for mb in micro:
            mb.positions = (mb.positions[:, -1:] + 1)
            mb.ids = next_tokens[mb.rows.start:mb.rows.stop, None]
        if step == 0:
            after_prompt = comm.snapshot()
        if bool(done.all()):
            break
    seconds = time.perf_counter() - t_origin
    for layer in model.layers:
        layer.attn.use_cache(None)
    every = [None] * world
    dist.all_gather_object(every, timeline)
    return PipelineRun(tokens, after_prompt, [event for part in every for event in part], step + 1, seconds)
