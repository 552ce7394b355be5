"""The interview question banks (book/questions/NN_topic.yaml): loading and the schema the
book and the practice mode rely on. A malformed bank is refused with its file and entry named.

Every entry: id, kind (concept, estimate or coding), tags, question, answer (Markdown with
LaTeX), difficulty (easy, medium, hard), minutes (the time budget in an interview) and
key_points (the checklist a good answer covers). Estimates add value (the book's number)
and a template with fresh inputs (`practice/estimates.py`); a coding question may name the
graded task that drills it (`task: "1.2"`)."""

from __future__ import annotations

from pathlib import Path

from .errors import DojoError

BANK_DIR = Path(__file__).resolve().parents[1] / "book" / "questions"
KINDS = ("concept", "estimate", "coding")
FIELDS = {"id", "kind", "tags", "question", "answer", "difficulty", "minutes", "key_points", "value", "template",
          "task"}
REQUIRED = {"id", "kind", "tags", "question", "answer", "difficulty", "minutes", "key_points"}
DIFFICULTIES = ("easy", "medium", "hard")
MIN_QUESTIONS = 15


class BankError(DojoError):
    """A question bank that does not follow the schema."""


def bank_paths(directory: Path = BANK_DIR) -> list[Path]:
    return sorted(Path(directory).glob("*.yaml"))


def load_bank(path: Path) -> dict:
    """The bank in `path`, checked: {chapter, title, questions: [...]}."""
    import yaml

    path = Path(path)
    try:
        bank = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise BankError(f"{path}:{line} is not valid YAML ({getattr(err, 'problem', err)}); fix the file") from None
    if not isinstance(bank, dict) or not {"chapter", "title", "questions"} <= set(bank):
        raise BankError(f"{path}: a bank is a mapping with chapter, title and questions")
    if not isinstance(bank["title"], str) or not bank["title"].strip():
        raise BankError(f"{path}: the title is empty")
    if bank["chapter"] != path.stem:
        raise BankError(f"{path}: chapter is {bank['chapter']!r}; it must be the file's name, {path.stem!r}")
    questions = bank["questions"]
    if not isinstance(questions, list) or len(questions) < MIN_QUESTIONS:
        raise BankError(f"{path}: questions must be a list of at least {MIN_QUESTIONS} entries")
    seen = set()
    for i, q in enumerate(questions):
        _check_entry(path, i, q, seen)
    return bank


def _check_entry(path: Path, index: int, q, seen: set) -> None:
    name = f"{path}: entry {index + 1}"
    if not isinstance(q, dict):
        raise BankError(f"{name} is not a mapping of fields")
    if "id" in q:
        name += f" (id {q['id']})"
    missing = REQUIRED - set(q)
    if missing:
        raise BankError(f"{name} lacks {', '.join(sorted(missing))}")
    if set(q) - FIELDS:
        raise BankError(f"{name} has unknown fields {', '.join(sorted(set(q) - FIELDS))}; allowed: {', '.join(sorted(FIELDS))}")
    if not str(q["id"]).startswith(path.stem[:2] + "-"):
        raise BankError(f"{name}: ids of this bank start with {path.stem[:2]}-")
    if str(q["id"]) in seen:
        raise BankError(f"{name}: the id is used twice")
    seen.add(str(q["id"]))
    if q["kind"] not in KINDS:
        raise BankError(f"{name}: kind {q['kind']!r} is not one of {', '.join(KINDS)}")
    if not isinstance(q["tags"], list) or not q["tags"] or not all(isinstance(t, str) for t in q["tags"]):
        raise BankError(f"{name}: tags must be a non-empty list of words (quote one like \"2:4\", which YAML "
                        f"would read as a number)")
    if not isinstance(q["question"], str) or not q["question"].strip():
        raise BankError(f"{name}: the question is empty")
    if not isinstance(q["answer"], str) or len(q["answer"].strip()) <= 80:
        raise BankError(f"{name}: the answer must be a written explanation (more than 80 characters)")
    if q["difficulty"] not in DIFFICULTIES:
        raise BankError(f"{name}: difficulty {q['difficulty']!r} is not one of {', '.join(DIFFICULTIES)}")
    if isinstance(q["minutes"], bool) or not isinstance(q["minutes"], (int, float)) or not 0 < q["minutes"] <= 30:
        raise BankError(f"{name}: minutes is the time budget, a number from 1 to 30")
    points = q["key_points"]
    if not isinstance(points, list) or not 2 <= len(points) <= 6 or \
            not all(isinstance(p, str) and 0 < len(p.strip()) <= 160 for p in points):
        raise BankError(f"{name}: key_points is a list of 2 to 6 short sentences (at most 160 characters each)")
    if q["kind"] == "estimate":
        from .practice.estimates import check_template

        problem = check_template(q)
        if problem:
            raise BankError(f"{name}: {problem}")
    elif "template" in q or "value" in q:
        raise BankError(f"{name}: only estimate questions carry a template and a value")
    if "task" in q and (q["kind"] != "coding" or not isinstance(q["task"], str)):
        raise BankError(f"{name}: task (a graded task id such as \"1.2\") belongs to coding questions")
