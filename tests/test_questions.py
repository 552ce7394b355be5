"""Question banks: the schema the book and the practice mode rely on, numbers recomputed
from the published configurations rather than trusted, and drills that name real tasks."""

from itertools import product

import pytest

from reference_engine.practice.estimates import default_inputs, instance
from reference_engine.questions import KINDS, bank_paths, load_bank

BANKS = bank_paths()


def test_there_is_a_bank_per_chapter_with_questions():
    assert len(BANKS) == 9, "one bank per chapter"


@pytest.mark.parametrize("path", BANKS, ids=lambda p: p.stem)
def test_schema(path):
    bank = load_bank(path)  # refuses a malformed bank, naming the entry (tests/test_book_build.py)
    assert {q["kind"] for q in bank["questions"]} == set(KINDS), "mix concepts, estimates and coding"
    assert {q["difficulty"] for q in bank["questions"]} >= {"easy", "hard"}, "a range of difficulty"


@pytest.mark.parametrize("path", BANKS, ids=lambda p: p.stem)
def test_estimates_state_their_value_and_have_fresh_numbers(path):
    for q in load_bank(path)["questions"]:
        if q["kind"] != "estimate":
            continue
        book = instance(q, default_inputs(q["template"]))
        assert book.answer == pytest.approx(q["value"], rel=1e-9)
        value = q["value"]
        shown = f"{value:,}" if isinstance(value, int) else f"{value:,g}"
        assert shown in q["answer"] or shown.replace(",", "{,}") in q["answer"], \
            f"{q['id']}: the answer should state {shown}"
        answers = {instance(q, dict(zip(q["template"]["inputs"], combo))).answer
                   for combo in product(*q["template"]["inputs"].values())}
        assert len(answers) >= 2, f"{q['id']}: every drawn variant gives the same number"


def test_coding_questions_name_real_tasks():
    from reference_engine.grading.tasks import TASKS, load_chapters

    load_chapters()
    named = [(q["id"], q["task"]) for path in BANKS for q in load_bank(path)["questions"] if "task" in q]
    assert len(named) >= 9, "coding questions should lead to drills"
    assert [n for n in named if n[1] not in TASKS] == []


def test_chapter_one_has_twenty_questions():
    bank = load_bank(next(p for p in BANKS if p.stem == "01_attention"))
    assert len(bank["questions"]) >= 20
