"""The course material: grade, progress, grade-class, make-exercises, book."""

from __future__ import annotations

import json

from ..errors import DojoError
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
    bk = sub.add_parser("book", help="build the HTML book (Sphinx, MyST-NB) from lessons/ and book/questions/; "
                                     "lessons execute through a cache, only when their code changed")
    bk.add_argument("--out", help="output folder (default book/_build/html)")
    bk.add_argument("--no-execute", action="store_true", help="render the lessons as committed, without running them")
    bk.add_argument("--source", help="another source folder with index.md and lessons/ (default book/)")
    bk.add_argument("--set", action="append", metavar="NAME=VALUE", help="a Sphinx setting (repeatable), for example "
                                                                          "nb_execution_cache_path=/tmp/cache")
    bk.add_argument("--quiet", action="store_true", help="only the last line (and errors)")


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


def cmd_book(args) -> int:
    from ..book import BOOK_DIR, DEFAULT_OUT, build_book

    settings = {}
    for item in args.set or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise DojoError(f"--set takes NAME=VALUE (a Sphinx setting), got {item!r}")
        settings[name] = value
    done = build_book(args.out or DEFAULT_OUT, source=args.source or BOOK_DIR, execute=not args.no_execute,
                      settings=settings, quiet=args.quiet)
    print(f"built {done['index']} in {done['seconds']:.0f} s ({done['executed']} lessons executed; "
          "the others came from the cache)" if not args.no_execute else
          f"built {done['index']} in {done['seconds']:.0f} s (lessons not executed)")
    return 0


COMMANDS = {"grade": cmd_grade, "progress": cmd_progress, "grade-class": cmd_grade_class,
            "make-exercises": cmd_make_exercises, "book": cmd_book}
