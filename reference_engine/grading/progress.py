"""`python -m reference_engine progress [DIR]`: tasks passed per chapter."""

from __future__ import annotations

from pathlib import Path

from ..errors import DojoError
from .grader import grade_path
from .tasks import CHAPTERS, load_chapters


def progress(folder: str | Path) -> list[dict]:
    """One row per chapter: tasks whose every check passes, out of the chapter's tasks."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DojoError(f"{folder} is not a folder; pass the folder with your exercise notebooks")
    load_chapters()
    rows = []
    for chapter, tasks in CHAPTERS.items():
        notebook = folder / f"{chapter.removeprefix('ch')}.ipynb"
        row = {"chapter": chapter, "notebook": str(notebook), "passed": 0, "total": len(tasks), "tasks": {}}
        if notebook.exists():
            report = grade_path(notebook)
            for task in tasks:
                ok = all(r.passed for r in report.results if r.task == task.id)
                row["tasks"][task.id] = ok
                row["passed"] += ok
        rows.append(row)
    return rows


def format_progress(rows: list[dict], folder) -> str:
    lines = [f"Progress in {folder}", ""]
    for row in rows:
        bar = "#" * row["passed"] + "." * (row["total"] - row["passed"])
        state = "" if Path(row["notebook"]).exists() else "  (notebook not found)"
        lines.append(f"  {row['chapter']:<20} [{bar}] {row['passed']}/{row['total']} tasks{state}")
    done = sum(r["passed"] for r in rows)
    lines += ["", f"  {done}/{sum(r['total'] for r in rows)} tasks passed"]
    return "\n".join(lines)
