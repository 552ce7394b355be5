"""The trusted grader as pytest: one test per check, marked by chapter and task.

    pytest tests/graders --notebook exercises/01_attention.ipynb
    pytest tests/graders --notebook exercises/01_attention.ipynb -m task_1_2

The learner's code runs in the grader's sandboxed child process, exactly as with
`python -m reference_engine grade`; nothing it does can reach this pytest process.
Without --notebook, each chapter's solution notebook is graded (and must pass).
"""

from pathlib import Path

import pytest

from reference_engine.grading.grader import grade_path
from reference_engine.grading.tasks import CHAPTERS, load_chapters

ROOT = Path(__file__).resolve().parents[2]
load_chapters()


def selected_chapters(config):
    notebook = config.getoption("--notebook")
    if notebook is None:
        return {ch: ROOT / "solutions" / f"{ch.removeprefix('ch')}.ipynb" for ch in CHAPTERS}
    stem = Path(notebook).stem
    matching = [ch for ch in CHAPTERS if stem.startswith(ch.removeprefix("ch"))]
    if not matching:  # a module or a renamed notebook: let the grader find the chapter
        matching = list(CHAPTERS)
    return {ch: Path(notebook) for ch in matching}


def pytest_generate_tests(metafunc):
    if "graded_check" not in metafunc.fixturenames:
        return
    params = []
    for chapter, path in selected_chapters(metafunc.config).items():
        for task in CHAPTERS[chapter]:
            marks = [getattr(pytest.mark, chapter), getattr(pytest.mark, f"task_{task.id.replace('.', '_')}")]
            for check in task.all_checks():
                params.append(pytest.param((str(path), task.id, check), marks=marks, id=f"{task.id}-{check}"))
    metafunc.parametrize("graded_check", params)


_reports = {}


def graded(path: str, task_id: str):
    """Each task graded once per session, whatever the number of its checks selected."""
    if (path, task_id) not in _reports:
        _reports[path, task_id] = grade_path(path, task_id=task_id)
    return _reports[path, task_id]


def test_check(graded_check):
    path, task_id, check = graded_check
    report = graded(path, task_id)
    result = next(r for r in report.results if r.name == check)
    assert result.passed, f"task {task_id}, check {check}: {result.message}"
