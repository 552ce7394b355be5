"""Question banks: the schema the book and a practice mode rely on, and numbers that are
recomputed from the model's configuration rather than trusted."""

from pathlib import Path

import pytest
import yaml

from reference_engine import ModelConfig

BANKS = sorted((Path(__file__).resolve().parents[1] / "book" / "questions").glob("*.yaml"))
KINDS = {"concept", "estimate", "coding"}


def load(path):
    return yaml.safe_load(path.read_text())


def test_there_is_a_bank_per_chapter_with_questions():
    assert BANKS, "no question banks found"


@pytest.mark.parametrize("path", BANKS, ids=lambda p: p.stem)
def test_schema(path):
    bank = load(path)
    assert bank["chapter"] == path.stem and bank["title"]
    questions = bank["questions"]
    assert len(questions) >= 15
    assert len({q["id"] for q in questions}) == len(questions), "duplicate ids"
    for q in questions:
        assert set(q) <= {"id", "kind", "tags", "question", "answer", "compute", "value"}, q["id"]
        assert q["id"].startswith(path.stem[:2] + "-"), q["id"]
        assert q["kind"] in KINDS, q["id"]
        assert q["question"].strip() and len(q["answer"].strip()) > 80, q["id"]
        assert isinstance(q["tags"], list) and q["tags"], q["id"]
        if q["kind"] == "estimate":
            assert "compute" in q and "value" in q, f"{q['id']}: estimates carry compute and value"
    assert {q["kind"] for q in questions} == KINDS, "mix concepts, estimates and coding"


@pytest.mark.parametrize("path", BANKS, ids=lambda p: p.stem)
def test_estimates_are_recomputed_from_the_model_config(path):
    c = ModelConfig.from_name("smollm2-135m")
    for q in load(path)["questions"]:
        if q["kind"] != "estimate":
            continue
        value = eval(q["compute"], {"__builtins__": {}}, {"c": c})  # repository data, not user input
        assert value == q["value"], f"{q['id']}: {q['compute']} = {value}, the bank says {q['value']}"
        assert f"{value:,}" in q["answer"] or f"{value:,}".replace(",", "{,}") in q["answer"], \
            f"{q['id']}: the answer should state {value:,}"


def test_chapter_one_has_twenty_questions():
    bank = load(next(p for p in BANKS if p.stem == "01_attention"))
    assert len(bank["questions"]) >= 20
