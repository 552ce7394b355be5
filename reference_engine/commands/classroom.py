"""Grading: grade, progress, grade-class, make-exercises."""

from __future__ import annotations

import json

from .common import with_progress


def add_commands(sub) -> None:
    gr = sub.add_parser("grade", help="grade an exercise notebook (or .py module) with the trusted grader")
    gr.add_argument("path", help="your exercise notebook, for example exercises/01_attention.ipynb")
    gr.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    gr.add_argument("--task", metavar="ID", help="grade one task only, for example 1.2")
    gr.add_argument("--timeout", type=float, default=60.0, help="seconds per task (default 60)")
    with_progress(gr)
    pr = sub.add_parser("progress", help="tasks passed per chapter in a folder of exercise notebooks")
    pr.add_argument("folder", nargs="?", default="exercises", help="default: exercises")
    pr.add_argument("--json", action="store_true")
    gc = sub.add_parser("grade-class", help="grade an nbgrader submitted/ tree with the trusted grader, "
                                             "writing scores into the gradebook")
    gc.add_argument("course", help="the nbgrader course folder (with gradebook.db and submitted/)")
    gc.add_argument("assignment", help="assignment name, for example 01_attention")
    gc.add_argument("--json", action="store_true")
    gc.add_argument("--timeout", type=float, default=60.0, help="seconds per task (default 60)")
    with_progress(gc)
    mk = sub.add_parser("make-exercises", help="generate exercises/ from solutions/ with nbgrader")
    mk.add_argument("--solutions", default="solutions")
    mk.add_argument("--exercises", default="exercises")


def cmd_grade(args) -> int:
    from ..grading.grader import grade_path
    from ..grading.report import format_report, live_progress

    report = grade_path(args.path, task_id=args.task, timeout_s=args.timeout, live=live_progress(args.progress))
    print(json.dumps(report.to_dict()) if args.json else format_report(report))
    return 0 if report.all_passed else 1


def cmd_progress(args) -> int:
    from ..grading.progress import format_progress, progress

    rows = progress(args.folder)
    print(json.dumps(rows) if args.json else format_progress(rows, args.folder))
    return 0


def cmd_grade_class(args) -> int:
    from ..grading.classroom import grade_class
    from ..grading.report import live_progress

    rows = grade_class(args.course, args.assignment, timeout_s=args.timeout, live=live_progress(args.progress, detail=False))
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            tasks = ", ".join(f"{t}: {s:g}" for t, s in row["scores"].items())
            print(f"  {row['student']:<16} {row['notebook']:<16} {row['score']:g}/{row['max_score']}  ({tasks})")
        print(f"wrote {len(rows)} trusted scores into {args.course}/gradebook.db")
    return 0


def cmd_make_exercises(args) -> int:
    from ..grading.release import make_exercises

    for path in make_exercises(args.solutions, args.exercises):
        print(f"wrote {path}")
    return 0


COMMANDS = {"grade": cmd_grade, "progress": cmd_progress, "grade-class": cmd_grade_class, "make-exercises": cmd_make_exercises}
