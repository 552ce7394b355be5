"""Grade a whole nbgrader class with the trusted grader.

    python -m reference_engine grade-class COURSE_DIR ASSIGNMENT

For every notebook under COURSE_DIR/submitted/STUDENT/ASSIGNMENT/, run the sandboxed
grader and write each task's score into the nbgrader gradebook as the manual score of
that task's test cell (grade id "test_N_M"), which nbgrader then uses instead of the
in-kernel autograde score: feedback, the formgrader and `nbgrader export` all show the
trusted scores. The assignment must have been released with `nbgrader generate_assignment`
(which records its test cells in the gradebook).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DojoError
from .grader import grade_path
from .report import SILENT, Live


def test_cell_for(task_id: str) -> str:
    """The nbgrader grade id of a task's test cell. Example: "1.2" -> "test_1_2"."""
    return "test_" + task_id.replace(".", "_")


def grade_class(course: str | Path, assignment: str, timeout_s: float = 60.0, live: Live = SILENT) -> list[dict]:
    """Grade every submission; returns one row per student and notebook with the scores written.
    `live` (report.Live) shows progress per submission."""
    from nbgrader.api import Gradebook, MissingEntry

    course = Path(course)
    db = course / "gradebook.db"
    if not db.exists():
        raise DojoError(f"{db} not found: release the assignment with nbgrader first "
                        f"(nbgrader generate_assignment {assignment})")
    submitted = sorted(course.glob(f"submitted/*/{assignment}/*.ipynb"))
    if not submitted:
        raise DojoError(f"no submissions found under {course}/submitted/*/{assignment}/")
    rows = []
    with Gradebook(f"sqlite:///{db}") as gb:
        try:
            gb.find_assignment(assignment)
        except MissingEntry:
            raise DojoError(f"assignment {assignment!r} is not in {db}; run nbgrader generate_assignment first") from None
        for index, path in enumerate(submitted, 1):
            student, notebook = path.parents[1].name, path.stem
            live.start_submission(index, len(submitted), student, path)
            report = grade_path(path, timeout_s=timeout_s, live=live)
            gb.update_or_create_student(student)
            try:
                gb.find_submission(assignment, student)
            except MissingEntry:
                gb.add_submission(assignment, student)
            scores = {}
            for task_id in sorted({r.task for r in report.results}):
                earned = sum(r.points for r in report.results if r.task == task_id)
                possible = sum(r.max_points for r in report.results if r.task == task_id)
                try:
                    grade = gb.find_grade(test_cell_for(task_id), notebook, assignment, student)
                except MissingEntry:
                    continue  # this notebook has no test cell for the task
                grade.manual_score = round(earned / possible * grade.max_score, 3) if possible else 0.0
                scores[task_id] = grade.manual_score
            gb.db.commit()
            rows.append({"student": student, "notebook": notebook, "scores": scores,
                         "score": sum(scores.values()), "max_score": report.max_score})
    return rows
