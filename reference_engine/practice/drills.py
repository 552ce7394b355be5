"""Timed coding drills: one graded task in a file of its own. `start` writes the task's
stub (from the exercise notebook) to a .py file the learner edits in their own editor;
`submit` grades that file with the trusted grader (sandbox, hidden cases) and records the
time taken against the limit, the score and the hints used.

Example: `practice drill start 1.1` writes dojo-drills/drill_1_1.py with a 10-minute limit;
`practice drill submit` grades it: "9/9 points in 6:12 of 10:00, no hints".
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from ..errors import DojoError
from .scheduler import utcnow

ROOT = Path(__file__).resolve().parents[2]
EXERCISES = ROOT / "exercises"
SOLUTIONS = ROOT / "solutions"
DEFAULT_MINUTES = 20
DEFAULT_DIR = Path("dojo-drills")


def tasks() -> dict:
    from ..grading.tasks import TASKS, load_chapters

    load_chapters()
    return TASKS


def task(task_id: str):
    known = tasks()
    if task_id not in known:
        raise DojoError(f"unknown drill {task_id!r}; `practice drill list` shows them ({', '.join(sorted(known))})")
    return known[task_id]


def minutes_for(task_id: str, questions: list[dict]) -> float:
    """The time budget of the bank's coding question that names this task, else the default."""
    budgets = [q["minutes"] for q in questions if q.get("task") == task_id]
    return max(budgets) if budgets else DEFAULT_MINUTES


def _cells(notebook: Path) -> dict[str, str]:
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    out = {}
    for cell in nb["cells"]:
        grade_id = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
        if cell["cell_type"] == "code" and grade_id:
            source = cell["source"]
            out[grade_id] = "".join(source) if isinstance(source, list) else source
    return out


def stub_source(task_id: str, minutes: float) -> str:
    """The drill file: a header, the exercise's imports, the solutions of the tasks this one
    calls (given, not drilled), and the task's stub."""
    t = task(task_id)
    header = (f'"""Drill {task_id}: {t.title} ({minutes:g} minutes).\n\n'
              f"Write `{t.function}` below, in your own editor. When it is ready:\n"
              f"    python -m reference_engine practice drill submit {{path}}\n"
              f"A hint, if you need one (it is recorded):\n"
              f"    python -m reference_engine practice drill hint {{path}}\n"
              f'The grader runs hidden cases in a sandbox; the clock started when this file was written.\n"""\n')
    if t.chapter == "drills":  # written for practice: the stub is kept with the task
        from ..grading.chapters.drills import STUBS

        return "\n\n".join([header, "import torch\nimport torch.nn.functional as F", STUBS[task_id]]).rstrip() + "\n"
    notebook = next(EXERCISES.glob(f"{t.chapter.removeprefix('ch')}*.ipynb"), None)
    if notebook is None:
        raise DojoError(f"{EXERCISES} has no notebook for {t.chapter}; run from a checkout of the course")
    cells = _cells(notebook)
    key = "task_" + task_id.replace(".", "_")
    stub = cells[key]
    given = []
    others = {o.function: o.id for o in tasks().values() if o.chapter == t.chapter and o.id != task_id}
    for name, other in others.items():
        if re.search(rf"\b{name}\b", stub):
            solution = _cells(SOLUTIONS / notebook.name)["task_" + other.replace(".", "_")]
            given.append(f"# Given: task {other}'s solution, which this task calls.\n"
                         + re.sub(r"\n\s*### BEGIN SOLUTION|\n\s*### END SOLUTION(\n\s*raise NotImplementedError.*)?", "",
                                  solution))
    return "\n\n".join([header, cells.get("imports", "import torch"), *given, stub]).rstrip() + "\n"


def start(store, task_id: str, folder: Path, minutes: float | None, questions: list[dict],
          unique: bool = False) -> tuple[Path, float]:
    """Write the drill's file into `folder` and start its clock. An existing file is never
    overwritten: refused, or with unique=True (a mock interview) the new file is numbered."""
    t = task(task_id)
    minutes = minutes if minutes is not None else minutes_for(task_id, questions)
    if not 0 < minutes <= 240:
        raise DojoError(f"--minutes must be between 0 and 240, not {minutes}")
    folder = Path(folder)
    stem = f"drill_{t.id.replace('.', '_')}"
    path = folder / f"{stem}.py"
    number = 1
    while unique and path.exists():
        number += 1
        path = folder / f"{stem}_{number}.py"
    if path.exists():
        raise DojoError(f"{path} exists (an earlier drill?); submit it, move it away, or pass --out another folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(stub_source(task_id, minutes).replace("{path}", str(path)), encoding="utf-8")
    except OSError as err:
        raise DojoError(f"cannot write the drill file {path} ({err.strerror}); pass --out a writable folder") from None
    store.start_drill(task_id, path, minutes * 60, utcnow())
    return path, minutes


def drill_of(store, path: str | None):
    """The drill recorded for `path` (or the latest one started)."""
    drill = store.drill_for(Path(path)) if path else store.latest_drill()
    if drill is None:
        where = f"for {path}" if path else "yet"
        raise DojoError(f"no drill started {where}; start one with `practice drill start TASK`")
    if not Path(drill["path"]).is_file():
        raise DojoError(f"{drill['path']} is gone; start the drill again with `practice drill start {drill['task']}`")
    return drill


def hint(store, path: str | None) -> str:
    """The next hint of the drill's task (the checks' hints, in order); counted."""
    drill = drill_of(store, path)
    hints = [c.hint for c in task(drill["task"]).all_checks().values()]
    used = store.use_hint(drill["drill_id"])
    if used > len(hints):
        return f"No more hints: all {len(hints)} are shown. Submit to see what the grader says."
    return f"Hint {used} of {len(hints)} (recorded): {hints[used - 1]}"


def check_syntax(path: Path) -> None:
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        ast.parse(text, filename=str(path))
    except SyntaxError as err:
        raise DojoError(f"{path} line {err.lineno}: {err.msg}; fix it in your editor and submit again "
                        "(the clock keeps running)") from None


def submit(store, path: str | None, live=None) -> dict:
    """Grade the drill's file with the trusted grader; record and return the result."""
    from ..grading.grader import grade_path
    from ..grading.report import SILENT, format_report

    drill = drill_of(store, path)
    check_syntax(Path(drill["path"]))
    report = grade_path(drill["path"], task_id=drill["task"], live=live or SILENT)
    seconds = store.record_submission(drill, utcnow(), report.score, report.max_score)
    in_time = seconds <= drill["limit_s"]
    return {"task": drill["task"], "score": report.score, "max_score": report.max_score,
            "passed": report.all_passed, "in_time": in_time, "seconds": seconds, "limit_s": drill["limit_s"],
            "hints": drill["hints"], "report": format_report(report)}


def clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def summary(result: dict) -> str:
    hints = "no hints" if not result["hints"] else f"{result['hints']} hint{'s' * (result['hints'] > 1)}"
    timing = f"in {clock(result['seconds'])} of {clock(result['limit_s'])}"
    if not result["in_time"]:
        timing += f" (over the limit by {clock(result['seconds'] - result['limit_s'])}: recorded as over time)"
    verdict = "passed" if result["passed"] else "not yet"
    return f"Drill {result['task']}: {result['score']}/{result['max_score']} points {timing}, {hints}; {verdict}."
