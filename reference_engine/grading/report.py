"""The grader's report as a table for people, or JSON for programs."""

from __future__ import annotations

import sys
import textwrap
import time


def format_report(report) -> str:
    lines = [f"Grading {report.path}", ""]
    lines.append(f"  {'task':<5} {'check':<20} {'points':>7}  result")
    previous = None
    for r in report.results:
        lines.append(f"  {r.task:<5} {r.name:<20} {f'{r.points}/{r.max_points}':>7}  {r.status}")
        repeated = (r.task, r.message) == previous  # a task-wide problem is said once
        previous = (r.task, r.message)
        if r.message and not repeated and (r.status != "pass" or r.name == "speed"):
            for part in textwrap.wrap(r.message, 92):
                lines.append(f"  {'':<5} {'':<20} {'':>7}    {part}")
    for note in report.notes:
        lines.append(f"  note: {note}")
    lines += ["", f"  score {report.score}/{report.max_score}" + ("  (all checks pass)" if report.all_passed else "")]
    return "\n".join(lines)


class Live:
    """Progress while grading, for a person at a terminal: each task as it starts, what its
    sandboxed child is doing, and each check as it is judged, with elapsed times. Written
    to stderr, so stdout keeps only the report (or the one JSON object of --json).
    detail=False (grade-class) prints one line per task instead of one per check."""

    def __init__(self, stream=None, detail: bool = True, enabled: bool = True):
        self.stream = stream if stream is not None else sys.stderr
        self.detail, self.enabled = detail, enabled
        self.tasks: list = []
        self.started = self.task_started = time.perf_counter()

    def _say(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def _since(self, t0: float) -> str:
        return f"{time.perf_counter() - t0:.1f} s"

    def start_notebook(self, path, tasks) -> None:
        self.tasks, self.started = list(tasks), time.perf_counter()
        if self.detail:
            self._say(f"Grading {path}: {len(self.tasks)} task{'s' * (len(self.tasks) != 1)}")

    def start_task(self, task) -> None:
        self.task_started = time.perf_counter()
        if self.detail:
            self._say(f"  [{self.tasks.index(task) + 1}/{len(self.tasks)}] task {task.id}: {task.title}")

    def stage(self, text: str) -> None:
        if self.detail:
            self._say(f"        {text} ... ({self._since(self.task_started)})")

    def end_task(self, task, results) -> None:
        score, total = sum(r.points for r in results), sum(r.max_points for r in results)
        if self.detail:
            for r in results:
                self._say(f"        {r.name:<20} {f'{r.points}/{r.max_points}':>6}  {r.status}")
            self._say(f"        task {task.id}: {score}/{total} in {self._since(self.task_started)}")
        else:
            self._say(f"    task {task.id} {task.title}: {score}/{total} ({self._since(self.task_started)})")

    def end_notebook(self, report) -> None:
        self._say(f"  {report.score}/{report.max_score} points, graded in {self._since(self.started)}")

    def start_submission(self, index: int, count: int, student: str, path) -> None:
        self._say(f"[{index}/{count}] {student}: {path}")


SILENT = Live(enabled=False)


def live_progress(wanted: bool | None, detail: bool = True) -> Live:
    """A reporter that shows progress when asked for (True), or by default (None) when
    stderr is a terminal; otherwise one that says nothing."""
    if wanted is None:
        wanted = sys.stderr.isatty()
    return Live(detail=detail, enabled=wanted)
