"""The classroom path with real nbgrader: release, autograde, export; and the trusted
re-grade of the same submissions written into the gradebook.

Slow (nbgrader starts a kernel per submission) but it is what an instructor runs."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reference_engine.grading.release import make_exercises, nbgrader, release, write_course_config

ROOT = Path(__file__).resolve().parents[1]
# Chapter 7 is the class's assignment here: the quickest to grade of the chapters whose checks
# run the learner's code in a harness (Triton kernels in the interpreter, no model to load).
ASSIGNMENT = "07_gpu_acceleration"
FULL = 51  # the chapter's points: 9 + 9 + 10 + 9 + 14
CHEAT = ("import reference_engine.grading.notebook as _nb\n_nb.check = lambda *args, **kwargs: None\n\n"
         "def softmax_rows(x, out):\n    return out\n")


def solution_code(grade_id: str) -> str:
    nb = json.loads((ROOT / "solutions" / f"{ASSIGNMENT}.ipynb").read_text())
    cell = next(c for c in nb["cells"] if c["metadata"].get("nbgrader", {}).get("grade_id") == grade_id)
    lines = "".join(cell["source"]).splitlines()
    return "\n".join(line for line in lines if "SOLUTION" not in line)


def submit(course: Path, student: str, released: Path, answers: dict[str, str]) -> None:
    """A submission: the released notebook with some solution cells filled in."""
    nb = json.loads(released.read_text())
    for cell in nb["cells"]:
        grade_id = cell["metadata"].get("nbgrader", {}).get("grade_id")
        if grade_id in answers:
            cell["source"] = answers[grade_id]
    target = course / "submitted" / student / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps(nb))


def read_grades(course: Path) -> dict[str, float]:
    result = nbgrader(course, "export", "--to", str(course / "grades.csv"))
    assert result.returncode == 0, result.stderr
    with open(course / "grades.csv") as f:
        return {row["student_id"]: float(row["raw_score"]) for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    course = tmp_path_factory.mktemp("course")
    write_course_config(course)
    for student in ("ada", "stub", "mutant", "cheater"):
        assert nbgrader(course, "db", "student", "add", student).returncode == 0
    released = release(ROOT / "solutions", course, ASSIGNMENT)
    solutions = {f"task_7_{i}": solution_code(f"task_7_{i}") for i in range(1, 6)}
    mean_over_block = next(m for m in yaml.safe_load((ROOT / "tests" / "mutants" / f"ch{ASSIGNMENT}.yaml").read_text())
                           if m["name"] == "rmsnorm_mean_over_the_block")["replace"][0]
    submit(course, "ada", released, solutions)
    submit(course, "stub", released, {})
    submit(course, "mutant", released, {**solutions, "task_7_2": solutions["task_7_2"].replace(
        mean_over_block["from"], mean_over_block["to"])})
    unfinished = {k: v for k, v in solutions.items() if k != "task_7_5"}  # 7.5 left as the released stub
    submit(course, "cheater", released, {**unfinished, "task_7_1": CHEAT})
    result = nbgrader(course, "autograde", ASSIGNMENT, "--force")
    assert result.returncode == 0, result.stdout + result.stderr
    return course


def test_nbgrader_autograde_scores_the_in_kernel_checks(course):
    grades = read_grades(course)
    assert grades["ada"] == FULL
    assert grades["stub"] == 0
    assert grades["mutant"] == FULL - 9  # task 7.2's test cell fails: the mean is taken over the block
    assert grades["cheater"] == FULL  # the in-kernel checks are fooled: why grade-class exists


def test_grade_class_writes_trusted_scores_into_the_gradebook(course):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "reference_engine", "grade-class", str(course), ASSIGNMENT, "--json"],
                            capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    rows = {row["student"]: row for row in json.loads(result.stdout)}
    assert rows["ada"]["score"] == FULL and rows["stub"]["score"] == 0
    assert rows["mutant"]["scores"]["7.2"] < 9
    assert rows["cheater"]["scores"] == {"7.1": 0.0, "7.2": 9.0, "7.3": 10.0, "7.4": 9.0, "7.5": 0.0}
    grades = read_grades(course)  # nbgrader's own export now shows the trusted scores
    assert grades["cheater"] == 28 and grades["ada"] == FULL and grades["stub"] == 0


def test_committed_exercises_are_generated_from_the_solutions(tmp_path):
    written = make_exercises(ROOT / "solutions", tmp_path)
    committed = sorted(p.name for p in (ROOT / "exercises").glob("*.ipynb"))
    assert sorted(p.name for p in written) == committed, "exercises/ and solutions/ hold different notebooks"
    for path in written:
        fresh, old = json.loads(path.read_text()), json.loads((ROOT / "exercises" / path.name).read_text())
        assert fresh == old, f"exercises/{path.name} is out of date: run  make exercises"
    shutil.rmtree(tmp_path)


ENDLESS = "\nwhile True:  # at the top level: every task's child runs this cell\n    try:\n        pass\n    except BaseException:\n        pass\n"


@pytest.mark.serial  # asserts a time
def test_grade_class_spends_one_time_limit_on_an_endless_shared_cell(tmp_path):
    """A submission whose task-7.1 cell never ends: every task runs that cell, so the trusted
    re-grade stops them all after one time limit (nbgrader's own autograde interrupts the
    kernel, and reports an error for the student when the code swallows the interrupt)."""
    import time

    course = tmp_path / "course"
    course.mkdir()
    write_course_config(course)
    assert nbgrader(course, "db", "student", "add", "looper").returncode == 0
    released = release(ROOT / "solutions", course, ASSIGNMENT)
    submit(course, "looper", released, {"task_7_1": solution_code("task_7_1") + ENDLESS})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "reference_engine", "grade-class", str(course), ASSIGNMENT,
                             "--timeout", "15", "--progress"], capture_output=True, text=True, timeout=600,
                            env=env, cwd=ROOT)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert elapsed < 2 * 15 + 20, f"{elapsed:.0f} s for a 15 s limit"
    assert "[1/1] looper" in result.stderr and "task 7.5" in result.stderr, result.stderr
    assert "looper" in result.stdout and f" 0/{FULL}" in result.stdout, result.stdout
