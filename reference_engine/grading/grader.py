"""Grade a notebook or module: for each task, run the learner's code in a sandboxed child,
then judge what came back. This is the trusted path behind `python -m reference_engine
grade` and `pytest tests/graders`."""

from __future__ import annotations

import inspect
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import DojoError
from . import checks
from .ranks import merge_ranks
from .report import SILENT, Live
from .sandbox import run_child
from .source import Cell, read_cells, scan
from .tasks import CHAPTERS, GPU_SPEED_NOTE, TASKS, Case, Task, load_chapters


@dataclass
class Report:
    path: str
    results: list[checks.CheckResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # cells that were not run, and why

    @property
    def score(self) -> int:
        return sum(r.points for r in self.results)

    @property
    def max_score(self) -> int:
        return sum(r.max_points for r in self.results)

    @property
    def all_passed(self) -> bool:
        return all(r.passed for r in self.results)

    def to_dict(self) -> dict:
        return {"path": self.path, "score": self.score, "max_score": self.max_score,
                "notes": self.notes, "checks": [r.to_dict() for r in self.results]}


def build_cases(task: Task, seeds: tuple[int, ...] | None = None) -> list[Case]:
    """Cases for the given seeds (default: the visible and the hidden ones)."""
    if seeds is None:
        # subtle: a rank that can rebuild the cases from known seeds can rebuild the other
        # ranks' inputs without communicating; the trusted grader draws their hidden cases anew
        hidden = task.hidden_seeds if task.world_size == 1 else tuple(secrets.randbelow(2**31) for _ in task.hidden_seeds)
        seeds = task.seeds + hidden
    cases = []
    for seed in seeds:
        cases += task.make_cases(torch.Generator().manual_seed(seed))
    if task.world_size > 1:  # a failed collective ends the ranks' later cases: the basic checks go first
        order = list(task.checks)
        cases.sort(key=lambda c: order.index(c.check))
    return cases


def _base_job(task: Task, cells: list[str]) -> dict:
    """What every child job of a task carries: the code to run and how to run it."""
    return {"cells": cells, "function": task.function, "blocked_modules": list(task.blocked_modules),
            "harness_source": _source(task.harness_source), "world_size": task.world_size,
            "report_each_call": task.world_size > 1}  # a rank that dies keeps the cases it finished


def build_job(task: Task, cells: list[str], cases: list[Case], timed: bool = True) -> dict:
    """Everything the child needs, as plain data. The parent keeps `cases` to judge with.
    timed=False leaves the speed measurement out (the grader asks for it separately, once
    the values are right)."""
    job = {**_base_job(task, cells), "calls": [{"args": c.args, "kwargs": c.kwargs} for c in cases],
           "same_object": None, "ops_call": 0 if task.forbidden_ops else None}  # the profiler costs time
    if "no_caching" in task.common_names:
        g = torch.Generator().manual_seed(1234)
        probe = next(c for c in cases if c.check == next(iter(task.checks)))
        # new values of the same scale (a different scale would only test float32 rounding)
        second = [torch.randn(a.shape, generator=g, dtype=a.dtype) * a.std() + a.mean()
                  if checks.is_float(a) else a for a in probe.args]
        job["same_object"] = {"first": probe.args, "second": second, "kwargs": probe.kwargs, "output": probe.output}
    if task.memory is not None:
        job["memory"] = {"args": task.memory.args, "kwargs": task.memory.kwargs}
    if task.speed is not None and timed:
        job.update(speed_job(task))
    return job


def speed_job(task: Task, round_: int = 0) -> dict:
    spec = task.speed
    g = torch.Generator().manual_seed(10_000 + round_)
    return {"speed": {"inputs": [spec.make_inputs(g) for _ in range(spec.pairs)], "kwargs": spec.kwargs},
            "baseline_source": _source(spec.baseline_source), "baseline_name": spec.baseline_name}


def _source(text: str | None) -> str | None:
    return None if text is None else inspect.cleandoc(text)


@dataclass
class StoppedCell:
    """A cell that never finished (endless, or it ended the process): every task whose
    code runs the same cells up to it would stop there too."""

    prefix: tuple[str, ...]  # the runnable cells up to and including it
    message: str
    memory_mb: int  # the child's memory limit: a child with more memory might get past the cell
    harness: str | None  # trusted set-up that ran first, spending time and memory of the same limits

    def stops(self, task: Task, runnable: list[str]) -> bool:
        """Would `task`, running these cells, stop there too? Yes when it runs the same cells
        under no more memory, after the same set-up (or the cell stopped with none)."""
        return (tuple(runnable[: len(self.prefix)]) == self.prefix and task.memory_mb <= self.memory_mb
                and self.harness in (None, task.harness_source))


def grade_task(task: Task, cells: list[Cell], timeout_s: float = 60.0, stopped: list[StoppedCell] | None = None,
               live: Live = SILENT) -> list[checks.CheckResult]:
    """Every check of one task. `stopped` carries the cells that stopped an earlier task's
    child: a task that would run the same cells fails at once with the same message,
    instead of waiting out its own time limit. `live` (report.Live) shows progress."""
    runnable = [c.source for c in cells if c.problem is None]
    for cell in stopped or []:
        if cell.stops(task, runnable):
            return checks.all_fail(task, cell.message)
    try:
        cases = build_cases(task)  # some tasks need the real model or its tokenizer here
    except DojoError as e:
        return checks.all_fail(task, f"cannot be graded on this machine: {e}")
    job = build_job(task, runnable, cases, timed=False)  # speed is measured only for correct code
    live.stage(f"running your code on {len(cases)} cases in the sandbox")
    run = run_child(job, timeout_s=timeout_s, memory_mb=task.memory_mb)
    problem = child_problem(task, run, cells)
    if problem:
        unfinished = unfinished_cell(run)
        if unfinished is not None and stopped is not None:
            memory_mb = 1 << 30 if run.timed_out else task.memory_mb  # endless whatever the memory
            stopped.append(StoppedCell(tuple(runnable[: unfinished + 1]), problem, memory_mb, task.harness_source))
        return checks.all_fail(task, problem)

    def remeasure(round_: int) -> dict | None:
        live.stage("timing your function against the baseline" + (f" (round {round_ + 1})" if round_ else ""))
        return measure_speed(task, runnable, round_, timeout_s)

    live.stage("comparing with the reference")
    observed = run.results["observed"]
    if task.world_size > 1:
        observed = merge_ranks(run.results["ranks"], len(cases), task.params)
    return checks.judge_task(task, cases, observed, job["same_object"], remeasure)


def measure_speed(task: Task, cells: list[str], round_: int, timeout_s: float = 60.0) -> dict | None:
    """One more speed measurement in a fresh child (inputs seeded by the round)."""
    job = {**_base_job(task, cells), "calls": [], "ops_call": None, **speed_job(task, round_)}
    run = run_child(job, timeout_s=timeout_s, memory_mb=task.memory_mb)
    return ((run.results or {}).get("observed") or {}).get("speed")


def unfinished_cell(run) -> int | None:
    """Index (among the runnable cells) of the cell the child was running when it stopped."""
    ran = (run.results or {}).get("cells") or []
    return len(ran) - 1 if ran and not ran[-1].get("finished", True) else None


def child_problem(task: Task, run, cells: list[Cell]) -> str | None:
    """Why nothing (or not enough) came back from the child, in the learner's terms."""
    res = run.results
    if res is not None and res.get("observed") is not None:
        return None
    unfinished = unfinished_cell(run)
    if unfinished is not None:
        number = _runnable_number(cells, unfinished)
        if run.timed_out:
            return (f"cell {number} did not finish within the time limit (an endless loop, or far too slow?); "
                    "every task runs the notebook's cells in order, so none could be graded")
        return (f"the grading process ended while running cell {number} (os._exit, a crash, or more memory than "
                "the limit); every task runs the notebook's cells in order, so none could be graded")
    if run.timed_out:
        where = "while calling it" if res and res.get("found") else "while running the notebook's cells"
        return f"did not finish within the time limit {where} (an endless loop, or far too slow?)"
    if res is not None and not res["found"]:
        errors = [f"cell {_runnable_number(cells, i)} raised {c['error']}" for i, c in enumerate(res["cells"])
                  if c["error"]]
        why = "; ".join([c.problem for c in cells if c.problem] + errors) or "no cell defines it"
        return f"no function named {task.function} was found ({why})"
    if res is not None and res.get("found"):
        return ("the grading process ended while calling your function (os._exit, sys.exit, a crash, or "
                "more memory than the limit)")
    return ("the grading process ended before reporting anything (os._exit, a crash, or more memory than "
            "the limit in your top-level code)")


def _runnable_number(cells: list[Cell], index: int) -> int:
    return [c for c in cells if c.problem is None][index].number


def resolve_tasks(cells: list[Cell], path: Path, task_id: str | list[str] | None) -> list[Task]:
    """The tasks to grade: the one asked for, or the chapter named by the file, or the
    chapter whose functions the code defines."""
    load_chapters()
    if task_id is not None:
        ids = [task_id] if isinstance(task_id, str) else list(task_id)
        for tid in ids:
            if tid not in TASKS:
                raise DojoError(f"unknown task {tid!r}; tasks are {', '.join(sorted(TASKS))}")
        return [TASKS[tid] for tid in ids]
    stem = path.stem.lower()
    for chapter, tasks in CHAPTERS.items():
        if stem.startswith(chapter.removeprefix("ch")) or stem.startswith(chapter):
            return tasks
    text = "\n".join(c.source for c in cells)
    for chapter, tasks in CHAPTERS.items():
        if any(f"def {t.function}(" in text for t in tasks):
            return tasks
    raise DojoError(f"{path} matches no chapter: name it like the exercise notebook (for example "
                    f"{next(iter(CHAPTERS)).removeprefix('ch')}.ipynb) or pass --task ID")


def grade_path(path: str | Path, task_id: str | list[str] | None = None, timeout_s: float = 60.0,
               live: Live = SILENT) -> Report:
    """Grade the tasks of the notebook's chapter (or the task ids given) in the sandbox.
    `live` (report.Live) shows progress as tasks and checks are judged."""
    path = Path(path)
    cells = read_cells(path)
    tasks = resolve_tasks(cells, path, task_id)
    blocked = tuple(sorted({m for t in tasks for m in t.blocked_modules}))
    # The scan runs once per set of allowances: a name one task may use (an optimiser's
    # gradient clipping) stays refused in the cells every other task runs.
    scanned = {allowed: [replace(c, problem=scan(c, blocked, allowed)) for c in cells]
               for allowed in {t.allowed_names for t in tasks}}
    notes = []
    for i, cell in enumerate(cells):
        problems = {t.id: scanned[t.allowed_names][i].problem for t in tasks}
        allowed = [task_id for task_id, problem in problems.items() if problem is None]
        problem = next((p for p in problems.values() if p), None)
        if problem and not allowed:
            notes.append(f"not run: {problem}")
        elif problem:  # fine for the tasks allowed to use it, refused for the others
            notes.append(f"cell {cell.number} runs for task {', '.join(allowed)} only: {problem.split(': ', 1)[1]}")
    if any(t.gpu_speed for t in tasks):
        notes.append(GPU_SPEED_NOTE)
    report = Report(str(path), notes=notes)
    stopped: list[StoppedCell] = []
    live.start_notebook(path, tasks)
    for task in tasks:
        live.start_task(task)
        results = grade_task(task, scanned[task.allowed_names], timeout_s, stopped, live)
        live.end_task(task, results)
        report.results += results
    live.end_notebook(report)
    return report
