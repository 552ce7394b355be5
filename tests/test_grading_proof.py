"""The graders are proven: release stubs score zero, every mutant (a plausible wrong
implementation) loses points on the check meant to catch it, and the solutions pass their
test cells in a kernel. That the solutions score full marks with the trusted grader is
`tests/graders/` (run without --notebook, it grades every chapter's solutions, check by
check)."""

from pathlib import Path

import pytest

from reference_engine.grading.grader import grade_path
from reference_engine.grading.tasks import CHAPTERS, load_chapters

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = sorted((Path(__file__).parent / "mutants").glob("*/*.py"))
load_chapters()


@pytest.fixture(scope="module", params=sorted(CHAPTERS))
def chapter(request):
    return request.param


def notebook(folder: str, chapter: str) -> Path:
    return ROOT / folder / f"{chapter.removeprefix('ch')}.ipynb"


def test_release_stubs_score_zero_with_not_implemented(chapter):
    report = grade_path(notebook("exercises", chapter))
    assert report.score == 0 and report.max_score > 0
    assert all("not implemented" in r.message for r in report.results)


def mutant_expectation(path: Path) -> tuple[str, str]:
    """The first docstring line names the task and the check that must catch it:
    '0.1 large_inputs: ...', or '0.1 every check: ...'."""
    head = path.read_text().split('"""')[1].split(":")[0]
    task, check = head.split(" ", 1)
    return task, check


def mutant_param(path: Path):
    """A mutant that must fail a speed check is timed with the CPU to itself (`serial`): on a
    busy machine its check may be judged inconclusive, which gives the points."""
    marks = [pytest.mark.serial] if mutant_expectation(path)[1] == "speed" else []
    return pytest.param(path, marks=marks, id=f"{path.parent.name}/{path.stem}")


@pytest.mark.parametrize("mutant", [mutant_param(p) for p in MUTANTS])
def test_mutant_loses_points_on_its_check(mutant):
    task, check = mutant_expectation(mutant)
    report = grade_path(mutant, task_id=task)
    by_name = {r.name: r for r in report.results}
    assert report.score < report.max_score
    if check == "every check":
        assert report.score == 0 and all(not r.passed for r in report.results)
    else:
        assert check in by_name, f"{check} is not a check of task {task}"
        assert not by_name[check].passed, f"{mutant.stem} should fail {check}: {by_name[check].message}"
        assert by_name[check].message, "a failed check must say why"


def test_every_task_has_at_least_three_mutants():
    counts = {}
    for mutant in MUTANTS:
        task, _ = mutant_expectation(mutant)
        counts[task] = counts.get(task, 0) + 1
    load_chapters()
    for tasks in CHAPTERS.values():
        for task in tasks:
            assert counts.get(task.id, 0) >= 3, f"task {task.id} has {counts.get(task.id, 0)} mutants"


def test_test_cell_points_equal_task_scores(chapter):
    """nbgrader's in-kernel score and the trusted score use the same scale."""
    import json

    nb = json.loads(notebook("solutions", chapter).read_text())
    points = {c["metadata"]["nbgrader"]["grade_id"]: c["metadata"]["nbgrader"]["points"]
              for c in nb["cells"] if c["metadata"].get("nbgrader", {}).get("grade")}
    for task in CHAPTERS[chapter]:
        assert points.get("test_" + task.id.replace(".", "_")) == task.max_score, task.id


# Chapter 1's notebook runs in a kernel in test_classroom.py (nbgrader's autograde); the
# other chapters' in-kernel checks are proven here.
IN_KERNEL = [ch for ch in sorted(CHAPTERS) if ch != "ch01_attention"]


@pytest.mark.parametrize("chapter_name", IN_KERNEL)
def test_solution_notebook_passes_its_test_cells_in_a_kernel(chapter_name, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(notebook("solutions", chapter_name), as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [f"{c.metadata['nbgrader']['grade_id']}: {o.evalue}" for c in nb.cells if c.cell_type == "code"
              for o in c.outputs if o.output_type == "error"]
    assert not errors
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    for task in CHAPTERS[chapter_name]:
        assert f"Task {task.id}: all" in printed and f"({task.max_score}/{task.max_score} points)" in printed
