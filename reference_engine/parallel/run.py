"""One entry point per rank: load the model, apply a scheme, generate, report.

`python -m reference_engine generate ... --parallel tp|pp|dp` under torchrun calls
`generate_on_rank` on every rank (`commands/run.py`); `run_local(greedy_on_rank, N, ...)`
does the same from a notebook or a test.
"""

from __future__ import annotations

import time

import torch

from ..errors import DojoError
from . import SCHEMES
from .comm import Comm


def prepare(scheme: str, model, comm: Comm):
    """The rank's part of the model for a scheme (in place); returns the model."""
    from . import pipeline, tensor

    if scheme not in SCHEMES:
        raise DojoError(f"unknown --parallel {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme == "tp":
        tensor.shard_model(model, comm)
    elif scheme == "pp":
        pipeline.keep_stage(model, comm.rank, comm.world)
    return model


def check_scheme(scheme: str, config, world: int, n_prompts: int, n_micro: int) -> None:
    """Refuse, before loading anything, a world size the scheme cannot split the model over."""
    from . import pipeline, tensor

    if scheme == "tp":
        tensor.kv_group_split(config.n_heads, config.n_kv_heads, world)
    elif scheme == "pp":
        pipeline.stage_layers(config.n_layers, world)
        if not 1 <= n_micro <= n_prompts:
            raise DojoError(f"--micro-batches {n_micro} with {n_prompts} prompt(s): use 1 to {n_prompts} "
                            "(one micro-batch holds at least one prompt)")


def generate_on_rank(scheme: str, prompts: list[list[int]], max_new_tokens: int, model_path=None,
                     n_micro: int = 1, stop_ids=()) -> dict:
    """This rank's run: tokens (the same on every rank), seconds, the collectives counted
    (`comm`: the whole run; `comm_per_token`: per decoding step, the prompt's step left
    out), and for pp the schedule's timeline. The process group must exist (`launch`)."""
    import torch.distributed as dist

    from ..load import load_model

    comm = Comm()
    t0 = time.perf_counter()
    model, _ = load_model(model_path)
    check_scheme(scheme, model.config, comm.world, len(prompts), n_micro)
    prepare(scheme, model, comm)
    load_s = time.perf_counter() - t0
    _run_scheme(scheme, model, comm, prompts[:1], 2, 1, stop_ids)  # warm-up: first calls allocate and set up
    for counter in (comm.calls, comm.bytes, comm.seconds):
        counter.clear()
    dist.barrier()  # start the clocks together: a rank still loading would slow the others' run
    t0 = time.perf_counter()
    run = _run_scheme(scheme, model, comm, prompts, max_new_tokens, n_micro, stop_ids)
    seconds = time.perf_counter() - t0
    tokens, steps, after_prompt = run["tokens"], run["steps"], run["after_prompt"]
    return {"scheme": scheme, "rank": comm.rank, "world": comm.world, "load_s": load_s, "timeline": run["timeline"],
            "tokens": tokens, "seconds": seconds, "steps": steps, "comm": comm.summary(),
            "comm_per_token": comm.summary(per=max(steps - 1, 1), since=after_prompt) if after_prompt else {}}


def _run_scheme(scheme: str, model, comm: Comm, prompts, max_new_tokens: int, n_micro: int, stop_ids) -> dict:
    """One generation under a scheme: tokens, steps, timeline (pp) and the collectives'
    counters once the prompt's forward was done (None for dp, which has no per-step ones)."""
    from . import data, pipeline

    if scheme == "dp":
        tokens = data.data_parallel_generate(model, comm, prompts, max_new_tokens, stop_ids)
        return {"tokens": tokens, "steps": max(len(t) for t in tokens), "timeline": None, "after_prompt": None}
    if scheme == "pp":
        run = pipeline.pipeline_generate(model, comm, prompts, max_new_tokens, n_micro, stop_ids)
        return {"tokens": run.tokens, "steps": run.steps, "timeline": run.timeline, "after_prompt": run.after_prompt}
    from ..generate import generate

    after_prompt = None

    def first_token(_row, _token):  # called once the prompt's forward is done
        nonlocal after_prompt
        after_prompt = after_prompt or comm.snapshot()

    g = generate(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids, on_token=first_token)
    return {"tokens": g.tokens, "steps": g.decode_steps + 1, "timeline": None, "after_prompt": after_prompt}


def greedy_on_rank(scheme: str, prompts: list[list[int]], max_new_tokens: int, model_path=None, n_micro: int = 1,
                   threads: int | None = None) -> dict:
    """`generate_on_rank` for `launch.run_local` (threads: PyTorch threads of this rank)."""
    if threads:
        torch.set_num_threads(threads)
    return generate_on_rank(scheme, prompts, max_new_tokens, model_path, n_micro)


def format_comm(summary: dict) -> str:
    """One line per kind of collective: calls and bytes per step, time per call."""
    lines = []
    for kind, s in summary.items():
        per_call = s["ms"] / s["calls"] if s["calls"] else 0.0
        lines.append(f"  {kind:18s} {s['calls']:7.1f} per step  {s['bytes'] / 1024:9.1f} KiB per step  "
                     f"{per_call:6.3f} ms per call")
    return "\n".join(lines) or "  none"


def logits_on_rank(ids: list[list[int]], model_path=None) -> torch.Tensor:
    """Tensor parallel logits (B, T, vocab) of one forward without a cache, for comparing
    with the single-process model (`launch.run_local(logits_on_rank, N, (ids,))`)."""
    from ..load import load_model

    model, _ = load_model(model_path)
    prepare("tp", model, Comm())
    with torch.inference_mode():
        return model(torch.tensor(ids))


def pipeline_timelines_on_rank(prompts: list[list[int]], max_new_tokens: int, micro_batches: list[int],
                               model_path=None, rounds: int = 1) -> dict[int, tuple[list, float]]:
    """Pipeline runs with each number of micro-batches, the model loaded once: {m: (timeline,
    seconds)}, for plotting the schedule and measuring its bubble (`launch.run_local`).
    With several rounds the numbers of micro-batches take turns and the seconds are each
    one's median, so a change in the machine's memory bandwidth falls on all of them alike;
    the timeline is the last round's."""
    import statistics

    from ..load import load_model
    from . import pipeline

    comm = Comm()
    model, _ = load_model(model_path)
    prepare("pp", model, comm)
    pipeline.pipeline_generate(model, comm, prompts[:1], 2, 1)  # warm-up
    timelines, seconds = {}, {m: [] for m in micro_batches}
    for _ in range(rounds):
        for m in micro_batches:
            run = pipeline.pipeline_generate(model, comm, prompts, max_new_tokens, m)
            timelines[m] = run.timeline
            seconds[m].append(run.seconds)
    return {m: (timelines[m], statistics.median(seconds[m])) for m in micro_batches}


def all_reduce_times_on_rank(numels: list[int], repeats: int = 50) -> dict[int, float]:
    """Median seconds per all_reduce of float32 tensors of each size (`comm.time_all_reduce`)."""
    from .comm import time_all_reduce

    return time_all_reduce(numels, repeats)
