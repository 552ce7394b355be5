"""Question banks: the schema the book and a practice mode rely on, and numbers that are
recomputed from the model's configuration rather than trusted."""

import pytest

from reference_engine import ModelConfig
from reference_engine.questions import KINDS, bank_paths, load_bank

BANKS = bank_paths()


def test_there_is_a_bank_per_chapter_with_questions():
    assert BANKS, "no question banks found"


@pytest.mark.parametrize("path", BANKS, ids=lambda p: p.stem)
def test_schema(path):
    bank = load_bank(path)  # refuses a malformed bank, naming the entry (tests/test_book_build.py)
    assert {q["kind"] for q in bank["questions"]} == set(KINDS), "mix concepts, estimates and coding"


@pytest.mark.parametrize("path", BANKS, ids=lambda p: p.stem)
def test_estimates_are_recomputed_from_the_model_config(path):
    c = ModelConfig.from_name("smollm2-135m")
    for q in load_bank(path)["questions"]:
        if q["kind"] != "estimate":
            continue
        value = eval(q["compute"], {"__builtins__": {}}, {"c": c})  # repository data, not user input
        assert value == q["value"], f"{q['id']}: {q['compute']} = {value}, the bank says {q['value']}"
        assert f"{value:,}" in q["answer"] or f"{value:,}".replace(",", "{,}") in q["answer"], \
            f"{q['id']}: the answer should state {value:,}"


def test_chapter_one_has_twenty_questions():
    bank = load_bank(next(p for p in BANKS if p.stem == "01_attention"))
    assert len(bank["questions"]) >= 20
