"""The practice drills that have no notebook (the classifier on SmolLM2's hidden states,
`grading/chapters/drills.py`): their stubs score zero, their solutions full marks, and
each wrong solution in tests/drill_mutants.yaml loses points on the check meant to catch it."""

from pathlib import Path

import pytest
import yaml

from reference_engine.grading.chapters.drills import STUBS
from reference_engine.grading.grader import grade_path

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = (ROOT / "solutions" / "drills.py").read_text()
MUTANTS = yaml.safe_load((Path(__file__).parent / "drill_mutants.yaml").read_text())


@pytest.mark.parametrize("task", sorted(STUBS))
def test_stub_scores_zero_and_solution_full_marks(task, tmp_path):
    stub = tmp_path / "stub.py"
    stub.write_text("import torch\n\n" + STUBS[task])
    report = grade_path(stub, task_id=task)
    assert report.score == 0 and all("not implemented" in r.message for r in report.results)
    solved = grade_path(ROOT / "solutions" / "drills.py", task_id=task)
    assert solved.all_passed, [r.message for r in solved.results if not r.passed]


def test_every_drill_has_three_mutants():
    for task in STUBS:
        assert sum(m["task"] == task for m in MUTANTS) >= 3


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m["name"])
def test_mutant_loses_points_on_its_check(mutant, tmp_path):
    text = SOLUTION
    for change in mutant["replace"]:
        assert text.count(change["from"]) == 1, f"{mutant['name']}: the patch no longer applies"
        text = text.replace(change["from"], change["to"])
    path = tmp_path / f"{mutant['name']}.py"
    path.write_text(text)
    report = grade_path(path, task_id=mutant["task"])
    by_name = {r.name: r for r in report.results}
    assert not by_name[mutant["check"]].passed, f"{mutant['name']} ({mutant['why']}) passed {mutant['check']}"


def test_the_classifier_benchmark_compares_fp32_and_int8_backbones():
    from reference_engine.practice.classifier import format_measure, measure

    rows = measure(seed=1, repeats=1, texts=50)
    for name in ("fp32", "int8"):
        assert rows[name]["texts_per_s"] > 0
        assert rows[name]["accuracy_fp32_head"] > 0.3, "five classes: chance is 20%"
    assert rows["texts"]["train"] + rows["texts"]["held_out"] == 50
    assert "int8 backbone speed" in format_measure(rows)
