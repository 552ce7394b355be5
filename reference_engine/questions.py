"""The interview question banks (book/questions/NN_topic.yaml): loading and the schema the
book relies on. A malformed bank is refused with its file and entry named."""

from __future__ import annotations

from pathlib import Path

from .errors import DojoError

BANK_DIR = Path(__file__).resolve().parents[1] / "book" / "questions"
KINDS = ("concept", "estimate", "coding")
FIELDS = {"id", "kind", "tags", "question", "answer", "compute", "value"}
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
    missing = {"id", "kind", "tags", "question", "answer"} - set(q)
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
    if not isinstance(q["tags"], list) or not q["tags"]:
        raise BankError(f"{name}: tags must be a non-empty list")
    if not isinstance(q["question"], str) or not q["question"].strip():
        raise BankError(f"{name}: the question is empty")
    if not isinstance(q["answer"], str) or len(q["answer"].strip()) <= 80:
        raise BankError(f"{name}: the answer must be a written explanation (more than 80 characters)")
    if q["kind"] == "estimate" and not {"compute", "value"} <= set(q):
        raise BankError(f"{name}: estimate questions carry compute and value")
