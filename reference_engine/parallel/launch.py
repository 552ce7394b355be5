"""Starting ranks: join a job that torchrun launched, or start one on this machine.
(CPU ranks over gloo; the GPU path with NCCL is not built.)

torchrun (`torch.distributed.run`) starts one process per rank and gives each RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_from_env` joins that job. The
same code runs on one machine (`--standalone`) or several (`--nnodes 2 --node-rank 0|1
--rdzv-backend c10d --rdzv-endpoint HOST:PORT`).

`run_local` starts the ranks itself, as processes of this machine, for a notebook or a
test: it returns every rank's result, and when one rank fails or the time runs out it
stops them all and says which rank did what. Every wait in this package has a timeout:
a collective with a missing peer raises after `timeout_s` instead of hanging.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from ..errors import DojoError

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_S = 60.0  # the longest any rank waits for another (joining, or in a collective)


def backend() -> str:
    """gloo: every scheme here keeps its model and its messages on the CPU, which NCCL
    (GPU memory only) cannot carry. A GPU version would use NCCL for the tensors and keep
    gloo for CPU-side coordination."""
    return "gloo"


def init_from_env(timeout_s: float = TIMEOUT_S) -> tuple[int, int]:
    """Join the process group that torchrun set up (gloo: see `backend`); returns (rank, world_size)."""
    missing = [name for name in LAUNCHER_ENV if name not in os.environ]
    if missing:
        raise DojoError(f"--parallel needs a launcher that starts the ranks ({', '.join(missing)} not set). Run it "
                        "as: torchrun --standalone --nproc-per-node 2 -m reference_engine generate \"...\" "
                        "--parallel tp")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    kind = backend()
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        dist.init_process_group(kind, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:  # DistStoreError and gloo's errors are RuntimeErrors
        raise DojoError(f"rank {rank} of {world}: the other ranks did not join at {where} within {timeout_s:.0f} s "
                        f"({str(e).splitlines()[0][:200]}). Start every rank (torchrun --nproc-per-node N on each "
                        "machine, the same --nnodes and --rdzv-endpoint) or raise --dist-timeout.") from None
    return rank, world


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, threads: int, timeout_s: float, fn: Callable, args: tuple,
            results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        init_from_env(timeout_s)
        # subtle: pickled here, by value. A tensor put on the queue as it is travels as a
        # shared-memory handle, which dies with this process if the parent reads it late.
        results.put((rank, "ok", pickle.dumps(fn(*args))))
    except BaseException as e:  # noqa: BLE001 (reported to the parent, which stops every rank)
        last = traceback.extract_tb(e.__traceback__)[-1:] if not isinstance(e, DojoError) else []
        where = f" (at {last[0].filename.rsplit('/', 1)[-1]}:{last[0].lineno})" if last else ""
        results.put((rank, "error", f"{type(e).__name__}: {e}{where}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


PEER_LOST = "by peer"  # gloo's words when the rank at the other end of a connection is gone


def _first_failure(procs, results, values: dict, errors: dict) -> str:
    """What went wrong first. A rank that dies makes its peers fail too ("connection reset
    by peer"): the rank that exited without a word is named first, then the first error."""
    time.sleep(0.5)  # the other ranks' messages, and exits, arrive
    while not results.empty():
        rank, status, value = results.get()
        if status == "error":
            errors.setdefault(rank, value)
        else:
            values[rank] = value
    world = len(procs)
    silent = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in errors and r not in values]
    if silent:
        return (f"rank {silent[0]} of {world} exited (code {procs[silent[0]].exitcode}) before returning; "
                "the other ranks were stopped")
    if errors:  # a rank's own error before the errors of its peers, who lost their connection to it
        rank = min(errors, key=lambda r: (PEER_LOST in errors[r] or "Connection closed" in errors[r], r))
        return f"rank {rank} of {world} failed: {errors[rank]}; the other ranks were stopped"
    return f"a rank of {world} exited before returning; the other ranks were stopped"


def run_local(fn: Callable, world_size: int, args: tuple = (), threads: int = 1,
              timeout_s: float = 300.0, dist_timeout_s: float = 30.0) -> list:
    """fn(*args) on world_size new processes of this machine, each a rank of one gloo (or
    NCCL) group with `threads` PyTorch threads. Returns the ranks' return values, by rank.

    fn must be importable by name (a function of a module, not of a notebook), and its
    value picklable. A rank that raises, exits, or is killed stops the job at once; so does
    the whole job running past timeout_s. Ranks wait at most dist_timeout_s for each other.
    Example: run_local(tensor.greedy_tokens, 3, (prompts, 16)) -> [tokens, tokens, tokens]
    """
    if world_size < 1:
        raise DojoError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")  # a fresh interpreter per rank: no threads or locks inherited by fork
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, threads, dist_timeout_s, fn, args, results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    values: dict[int, object] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(values) < world_size:
            try:
                rank, status, value = results.get(timeout=0.2)
            except queue.Empty:
                if any(p.exitcode is not None and r not in values for r, p in enumerate(procs)):
                    raise DojoError(_first_failure(procs, results, values, {})) from None
                if time.monotonic() > deadline:
                    raise DojoError(f"the {world_size} ranks did not finish within {timeout_s:.0f} s; all were "
                                    "stopped") from None
                continue
            if status == "error":
                raise DojoError(_first_failure(procs, results, values, {rank: value}))
            values[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=5 if len(values) == world_size else 0)
            if p.is_alive():
                p.kill()
                p.join()
    return [values[r] for r in range(world_size)]
