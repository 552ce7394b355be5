"""The cards: every chapter's question bank, filtered by chapter, kind and tag, and the
queue of what to answer now (due reviews first, then a few new questions)."""

from __future__ import annotations

from datetime import datetime

from ..errors import DojoError
from ..questions import KINDS, bank_paths, load_bank

# Mock interviews draw from chapters grouped by what a role asks about.
TRACKS = {
    "attention-decoding": ("01", "02", "03"),
    "compression": ("04", "05", "06"),
    "systems-serving": ("07", "08", "09"),
}


def all_questions() -> list[dict]:
    """Every question of every bank, with its chapter ("01_attention") and title added."""
    out = []
    for path in bank_paths():
        bank = load_bank(path)
        for q in bank["questions"]:
            out.append({**q, "id": str(q["id"]), "chapter": bank["chapter"], "chapter_title": bank["title"]})
    return out


def chapter_of(name: str, questions: list[dict]) -> str:
    """'1', '01', '01_attention' or 'attention' -> '01_attention'; an unknown name is refused."""
    chapters = sorted({q["chapter"] for q in questions})
    wanted = str(name).strip().lower()
    for chapter in chapters:
        number, _, topic = chapter.partition("_")
        if wanted in (chapter, number, number.lstrip("0"), topic) or (len(wanted) > 3 and topic.startswith(wanted)):
            return chapter
    raise DojoError(f"unknown chapter {name!r}; chapters are {', '.join(chapters)} (a number such as 3 works too)")


def select(questions: list[dict], chapters=(), kinds=(), tags=()) -> list[dict]:
    """The questions of these chapters, kinds and tags (each filter empty = all)."""
    chosen = {chapter_of(c, questions) for c in chapters}
    for kind in kinds:
        if kind not in KINDS:
            raise DojoError(f"unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
    known_tags = {t for q in questions for t in q["tags"]}
    for tag in tags:
        if tag not in known_tags:
            close = sorted(t for t in known_tags if tag in t or t in tag)[:8]
            hint = f" (did you mean {', '.join(close)}?)" if close else "; `practice tags` lists them"
            raise DojoError(f"unknown tag {tag!r}{hint}")
    picked = [q for q in questions
              if (not chosen or q["chapter"] in chosen) and (not kinds or q["kind"] in kinds)
              and (not tags or set(tags) & set(q["tags"]))]
    if not picked:
        raise DojoError("no question matches these filters together; loosen one of --chapter, --kind, --tag")
    return picked


def queue(questions: list[dict], cards: dict, now: datetime, new_limit: int, limit: int | None) -> list[dict]:
    """Due cards (most overdue first), then up to `new_limit` never-answered ones in bank order."""
    due = sorted((q for q in questions if q["id"] in cards and datetime.fromisoformat(cards[q["id"]]["due"]) <= now),
                 key=lambda q: cards[q["id"]]["due"])
    new = [q for q in questions if q["id"] not in cards][:max(new_limit, 0)]
    items = due + new
    return items[:limit] if limit is not None else items
