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

from ...parallel.tensor import shares

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
    """The tensor's bytes, read through torch.Tensor itself (a subclass may lie in its own numel)."""
    return torch.Tensor.numel(value) * torch.Tensor.element_size(value) if isinstance(value, torch.Tensor) else 0


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
    SYNC = dist.new_group(backend="gloo", timeout=timedelta(seconds=3 * TIMEOUT_S))  # a rank may first wait out one
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


def mine(n: int, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous share of range(n) (torch.tensor_split's rule, `parallel.tensor.shares`)."""
    share = shares(n, world)[rank]
    return torch.arange(share.start, share.stop)


def others(n: int, rank: int, world: int) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[mine(n, rank, world)] = False
    return keep.nonzero().flatten()


def head_shares(n_heads: int, n_kv_heads: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The query heads and KV heads that are not this rank's (split by KV group)."""
    kv = mine(n_kv_heads, rank, world)
    group = n_heads // n_kv_heads
    heads = (kv[:, None] * group + torch.arange(group)).flatten()
    other_heads = torch.ones(n_heads, dtype=torch.bool)
    other_heads[heads] = False
    return other_heads.nonzero().flatten(), others(n_kv_heads, rank, world)


def rows_of(heads: torch.Tensor, size: int) -> torch.Tensor:
    return (heads[:, None] * size + torch.arange(size)).flatten()


# Each rank gets the inputs with every value outside its own share replaced by NaN: a
# rank that computes more than its part (and throws the rest away, or scales it down)
# gets NaN, whatever it does to hide the work from the counters. The parent's reference
# uses the clean inputs.
def poison_row_linear(rank, world, x, weight, bias):
    cols = others(weight.shape[1], rank, world)
    x, weight = x.clone(), weight.clone()
    x[:, cols], weight[:, cols] = float("nan"), float("nan")
    return x, weight, bias


def poison_mlp(rank, world, x, w_gate, w_up, w_down):
    hidden = others(w_gate.shape[0], rank, world)
    w_gate, w_up, w_down = w_gate.clone(), w_up.clone(), w_down.clone()
    w_gate[hidden], w_up[hidden], w_down[:, hidden] = float("nan"), float("nan"), float("nan")
    return x, w_gate, w_up, w_down


def poison_attention(rank, world, x, wq, wk, wv, wo, n_heads, n_kv_heads):
    D = wq.shape[0] // n_heads
    heads, kv = head_shares(n_heads, n_kv_heads, rank, world)
    wq, wk, wv, wo = wq.clone(), wk.clone(), wv.clone(), wo.clone()
    wq[rows_of(heads, D)], wo[:, rows_of(heads, D)] = float("nan"), float("nan")
    wk[rows_of(kv, D)], wv[rows_of(kv, D)] = float("nan"), float("nan")
    return x, wq, wk, wv, wo, n_heads, n_kv_heads


def poison_rows(rank, world, x, weight):
    x = x.clone()
    x[others(x.shape[0], rank, world)] = float("nan")
    return x, weight


def own_row(rank, world, stacked):
    return (stacked[rank].clone(),)


INPUTS = {"row_linear": poison_row_linear, "mlp": poison_mlp, "attention": poison_attention, "rows": poison_rows,
          "own_row": own_row}


def wrap_task(fn, rank: int, world: int, inputs: str):
    """fn on this rank, returning [output, stats]; `inputs` names what this rank is given
    of the case's arguments (`INPUTS`: its share, the rest NaN; or its own row)."""
    broken = []
    prepare = INPUTS[inputs]

    def wrapped(*args, **kwargs):
        if broken:
            raise RuntimeError(broken[0])
        args = prepare(rank, world, *args)
        COUNTS.clear()
        error, out, stats = None, None, None
        try:
            with FlopCounterMode(display=False) as counter:
                out = fn(*args, **kwargs)
            if type(out) is not torch.Tensor:
                raise TypeError(f"returned {type(out).__name__}; return one torch.Tensor")
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
            broken.append(f"not run: an earlier case failed on rank {r} ({s}) after the ranks had communicated, "
                          "which may leave their collectives out of step; fix that case first")
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"rank {failed[0][0]} failed on this case: {failed[0][1]}")
        return [out, stats]

    return wrapped
