"""Generate exercises/ from solutions/ with nbgrader's own generate step.

`python -m reference_engine make-exercises` builds a throw-away nbgrader course in a
temporary folder, puts each solution notebook in its source/, runs
`nbgrader generate_assignment`, and copies the released notebooks to exercises/.
Solution regions become "# YOUR CODE HERE", so the line after each region, a
`raise NotImplementedError("Task N.M: ...")` that the solution never reaches, is
what a learner sees run until the task is done. Hidden tests are removed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import DojoError

NBGRADER_CONFIG = (
    "c = get_config()\n"
    'c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE"}\n'
    "c.ExecutePreprocessor.timeout = 180  # task 1.5 loads SmolLM2 inside its test cell\n"
)


def nbgrader(course: Path, *args: str) -> subprocess.CompletedProcess:
    """Run an nbgrader command in `course`; nbgrader calls `alembic` from the same bin folder."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([sys.executable, "-m", "nbgrader", *args, f"--CourseDirectory.root={course}"],
                          cwd=course, env=env, capture_output=True, text=True, timeout=600)


def write_course_config(course: Path) -> None:
    (course / "nbgrader_config.py").write_text(NBGRADER_CONFIG)


def release(solutions: Path, course: Path, name: str) -> Path:
    """Generate the release version of solutions/NAME.ipynb inside `course`; returns its path."""
    source = course / "source" / name
    source.mkdir(parents=True, exist_ok=True)
    shutil.copy(solutions / f"{name}.ipynb", source / f"{name}.ipynb")
    result = nbgrader(course, "generate_assignment", name, "--force")
    released = course / "release" / name / f"{name}.ipynb"
    if result.returncode != 0 or not released.exists():
        raise DojoError(f"nbgrader generate_assignment failed for {name}:\n{result.stdout}{result.stderr}")
    return released


def make_exercises(solutions: str | Path = "solutions", exercises: str | Path = "exercises") -> list[Path]:
    solutions, exercises = Path(solutions), Path(exercises)
    names = sorted(p.stem for p in solutions.glob("*.ipynb"))
    if not names:
        raise DojoError(f"no notebooks in {solutions}")
    exercises.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="dojo-course-") as tmp:
        course = Path(tmp)
        write_course_config(course)
        for name in names:
            target = exercises / f"{name}.ipynb"
            shutil.copy(release(solutions, course, name), target)
            written.append(target)
    return written
