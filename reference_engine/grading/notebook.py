"""`check(task_id, fn)`: the graded test cells' entry point, inside the learner's kernel.

The same observations and the same judgements as the trusted grader, run in-process for
instant feedback and for nbgrader's autograde. Two nbgrader traps shape it:
  - any output on stderr makes nbgrader zero the cell, so everything runs with file
    descriptor 2 pointed at /dev/null (the profiler's C++ layer writes there directly);
  - a cell that ends in an expression gets credit unless it raises, so `check` raises
    AssertionError on any failed check and returns None.
Code in the same kernel can defeat these checks (see grader.py for the path that it
cannot); they are for feedback, and for classes that accept that.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import replace

from . import checks, observe
from .grader import build_cases, build_job
from .ranks import merge_ranks
from .tasks import TASKS, load_chapters


@contextlib.contextmanager
def quiet_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        with warnings.catch_warnings(), open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def run_checks(task_id: str, fn, hidden: bool = False) -> list[checks.CheckResult]:
    load_chapters()
    task = TASKS[task_id]
    if hidden:  # unseen inputs for the value checks; speed and memory were measured by the visible call
        task = replace(task, speed=None, memory=None)
    cases = build_cases(task, task.hidden_seeds if hidden else task.seeds)
    job = build_job(task, [], cases)
    baseline = None
    if task.speed is not None:
        namespace = {}
        exec(compile(job["baseline_source"], "baseline", "exec"), namespace)
        baseline = namespace[job["baseline_name"]]
    signature = observe.signature_of(fn)
    if task.world_size > 1:
        observed = observe_on_ranks(task, job, fn, signature)
        return checks.judge_task(task, cases, observed, None, lambda _round: None)
    if job["harness_source"]:  # the task runs fn inside something bigger (the engine, for 1.5)
        harness = {}
        exec(compile(job["harness_source"], "harness", "exec"), harness)
        fn = harness["wrap"](fn)
    with quiet_stderr():
        observed = observe.run_job(fn, job, baseline, signature=signature)

    def remeasure(_round: int) -> dict:
        with quiet_stderr():
            return observe.observe_speed(fn, baseline, job["speed"]["inputs"], job["speed"]["kwargs"])

    return checks.judge_task(task, cases, observed, job["same_object"], remeasure)


def observe_on_ranks(task, job: dict, fn, signature, timeout_s: float = 120.0) -> dict:
    """Run the job on task.world_size ranks forked from this kernel, one gloo group (the
    harness joins it), and merge what each observed. A rank still running at the deadline
    is killed; its missing cases are reported as such."""
    import signal
    import tempfile
    import time

    import torch

    with tempfile.TemporaryDirectory(prefix="dojo-ranks-") as tmp:
        pids = []
        for rank in range(task.world_size):
            pid = os.fork()
            if pid == 0:  # a rank: never returns into the kernel
                code, saved = 1, os.path.join(tmp, f"rank{rank}.pt")
                try:
                    # subtle: OpenMP's threads do not survive a fork; a parallel region in
                    # the copy of a process that used them waits for them forever
                    torch.set_num_threads(1)
                    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the kernel's output threads are not here)
                    with quiet_stderr():
                        harness = {"RANK": rank, "WORLD_SIZE": task.world_size, "STORE": os.path.join(tmp, "store")}
                        exec(compile(job["harness_source"], "harness", "exec"), harness)
                        observed = observe.run_job(harness["wrap"](fn), job, signature=signature)
                        torch.save({"observed": observed}, saved)
                    code = 0
                except BaseException as e:  # noqa: BLE001 (the rank could not start: say why, not a signature)
                    torch.save({"observed": None, "error": observe.describe_error(e)}, saved)
                finally:
                    os._exit(code)
            pids.append(pid)
        deadline = time.monotonic() + timeout_s
        waiting = set(pids)
        while waiting and time.monotonic() < deadline:
            for pid in list(waiting):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    waiting.discard(pid)
            time.sleep(0.05)
        for pid in waiting:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        by_rank = []
        for rank in range(task.world_size):
            path = os.path.join(tmp, f"rank{rank}.pt")
            by_rank.append(torch.load(path, weights_only=True) if os.path.exists(path) else None)
    return merge_ranks(by_rank, len(job["calls"]), task.params)


def check(task_id: str, fn, hidden: bool = False) -> None:
    """Run task `task_id`'s checks on `fn`. Prints a short summary; raises AssertionError
    naming every failed check (with a hint) when anything fails."""
    results = run_checks(task_id, fn, hidden)
    failed = [r for r in results if not r.passed]
    score, total = sum(r.points for r in results), sum(r.max_points for r in results)
    label = "hidden checks" if hidden else "checks"
    if failed:
        lines = [f"Task {task_id}: {score}/{total} points; {len(failed)} {label} failed:"]
        lines += [f"  - {r.name}: {r.message}" for r in failed]
        raise AssertionError("\n".join(lines))
    print(f"Task {task_id}: all {len(results)} {label} pass ({score}/{total} points).")

