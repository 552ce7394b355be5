"""The graders are proven: release stubs score zero, every mutant (a plausible wrong
implementation) loses points on the check meant to catch it, and the solutions pass their
test cells in a kernel. That the solutions score full marks with the trusted grader is
`tests/graders/` (run without --notebook, it grades every chapter's solutions, check by
check)."""

import json
from pathlib import Path

import pytest
import yaml

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
    assert_loses_points(grade_path(mutant, task_id=task), task, check, mutant.stem)


# -- mutants written as patches of the solution (tests/mutants/CHAPTER.yaml) -------------------------


def solution_source(chapter: str) -> str:
    """The solution notebook's code as a learner's module: every code cell but the test cells."""
    nb = json.loads(notebook("solutions", chapter).read_text())
    return "\n\n".join("".join(c["source"]) for c in nb["cells"]
                        if c["cell_type"] == "code" and not c["metadata"].get("nbgrader", {}).get("grade"))


def patched_mutants():
    for path in sorted((Path(__file__).parent / "mutants").glob("*.yaml")):
        for mutant in yaml.safe_load(path.read_text()):
            yield pytest.param(path.stem, mutant, id=f"{path.stem}/{mutant['name']}")


@pytest.mark.parametrize("chapter,mutant", list(patched_mutants()))
def test_patched_mutant_loses_points_on_its_check(chapter, mutant, tmp_path):
    text = solution_source(chapter)
    for change in mutant["replace"]:
        assert text.count(change["from"]) == 1, (f"{mutant['name']}: {change['from']!r} is not in the solution "
                                                 "exactly once; update the patch with the solution")
        text = text.replace(change["from"], change["to"])
    path = tmp_path / f"{mutant['name']}.py"
    path.write_text(text)
    assert_loses_points(grade_path(path, task_id=mutant["task"]), mutant["task"], mutant["check"], mutant["name"])


def assert_loses_points(report, task: str, check: str, name: str) -> None:
    by_name = {r.name: r for r in report.results}
    assert report.score < report.max_score
    if check == "every check":
        assert report.score == 0 and all(not r.passed for r in report.results)
    else:
        assert check in by_name, f"{check} is not a check of task {task}"
        assert not by_name[check].passed, f"{name} should fail {check}: {by_name[check].message}"
        assert by_name[check].message, "a failed check must say why"


def test_every_task_has_at_least_three_mutants():
    counts = {}
    tasks_of_mutants = [mutant_expectation(m)[0] for m in MUTANTS] + [p.values[1]["task"] for p in patched_mutants()]
    for task in tasks_of_mutants:
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
