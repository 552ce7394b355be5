"""Chapter 8's harness, run in every rank of the grading child before the learner's code:
join the ranks into one gloo group, record every collective the learner's code calls and
the multiply-adds it does, and keep the ranks in step from case to case.

The learner's function is called on every rank with the same case. It returns its output
and a vector of what it did (`STATS`), which the parent judges: values on every rank, the
number of all-reduces, the messages and bytes of a ring, the share of the work per rank.
A case that fails on any rank (an error, or a collective that timed out because a peer
never joined it) leaves the ranks' collectives out of step: the later cases of the task
are then refused with the reason, instead of hanging or mixing up messages.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

TIMEOUT_S = 4  # a collective with a missing peer fails after this (every wait is bounded)
STATS = ("all_reduce", "all_gather", "other_collectives", "messages_sent", "messages_received", "bytes_sent",
         "flops")
SENDS = ("send", "isend")
RECEIVES = ("recv", "irecv")
GATHERS = ("all_gather", "all_gather_into_tensor", "all_gather_object")
OTHERS = ("broadcast", "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather",
          "gather_object", "scatter", "scatter_object_list", "all_to_all", "all_to_all_single", "barrier",
          "batch_isend_irecv", "all_reduce_coalesced", "monitored_barrier")
COUNTS: Counter = Counter()
SYNC = None  # a second group, for the harness only: the learner's failed collectives cannot jam it


def _bytes(value) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


DEPTH = [0]  # subtle: dist.recv calls dist.irecv inside; only the learner's own call counts


def _recorded(name: str, original):
    def call(*args, **kwargs):
        if DEPTH[0] == 0:
            COUNTS[name] += 1
            if name in SENDS:
                COUNTS["bytes_sent"] += _bytes(args[0] if args else kwargs.get("tensor"))
        DEPTH[0] += 1
        try:
            return original(*args, **kwargs)
        finally:
            DEPTH[0] -= 1
    call.__name__ = name
    return call


def join(rank: int, world: int, store_path: str) -> None:
    """Every rank of this child into one gloo group (over the loopback), and the recorder on."""
    global SYNC
    if sys.platform.startswith("linux"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT_S))
    SYNC = dist.new_group(backend="gloo")
    from torch.distributed import distributed_c10d

    for name in SENDS + RECEIVES + GATHERS + OTHERS + ("all_reduce",):
        original = getattr(dist, name, None)
        if original is not None:
            wrapped = _recorded(name, original)
            setattr(dist, name, wrapped)
            if getattr(distributed_c10d, name, None) is original:
                setattr(distributed_c10d, name, wrapped)


def stats_vector(flops: int) -> torch.Tensor:
    counts = {
        "all_reduce": COUNTS["all_reduce"],
        "all_gather": sum(COUNTS[n] for n in GATHERS),
        "other_collectives": sum(COUNTS[n] for n in OTHERS),
        "messages_sent": sum(COUNTS[n] for n in SENDS),
        "messages_received": sum(COUNTS[n] for n in RECEIVES),
        "bytes_sent": COUNTS["bytes_sent"],
        "flops": flops,
    }
    return torch.tensor([float(counts[k]) for k in STATS], dtype=torch.float64)


def wrap_task(fn, rank: int, world: int, own_row: bool = False):
    """fn on this rank, returning [output, stats]. own_row: the case's first argument is
    stacked by rank (world, ...), and this rank is given its own row (a ring's inputs)."""
    broken = []

    def wrapped(*args, **kwargs):
        if broken:
            raise RuntimeError(broken[0])
        if own_row:
            args = (args[0][rank].clone(), *args[1:])
        COUNTS.clear()
        error, out, stats = None, None, None
        try:
            with FlopCounterMode(display=False) as counter:
                out = fn(*args, **kwargs)
            stats = stats_vector(counter.get_total_flops())  # now: the harness's own collectives follow
        except Exception as e:  # noqa: BLE001 (reported, after the ranks agree where they are)
            error = e
        status = "ok" if error is None else f"{type(error).__name__}: {str(error)[:200]}"
        talked = sum(COUNTS[n] for n in SENDS + RECEIVES + GATHERS + OTHERS + ("all_reduce",))
        everyone = [None] * world
        try:
            dist.all_gather_object(everyone, (status, talked), group=SYNC)
        except RuntimeError:
            everyone = [(status, 1) if r == rank else ("did not reach the end of the case in time", 1)
                        for r in range(world)]
        failed = [(r, s) for r, (s, _) in enumerate(everyone) if s != "ok"]
        # every rank raised before communicating (a stub, a bad index): the ranks are still in step
        in_step = len(failed) == world and not any(n for _, n in everyone)
        if failed and not in_step:
            r, s = failed[0]
            broken.append(f"not run: an earlier case failed on rank {r} ({s}), which leaves the ranks' "
                          "collectives out of step; fix that case first")
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"rank {failed[0][0]} failed on this case: {failed[0][1]}")
        return [out, stats] if isinstance(out, torch.Tensor) else out

    return wrapped
