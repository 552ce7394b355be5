"""A mock interview: a timed session on one track mixing concept questions, estimates with
fresh numbers and one coding drill, ending with a Markdown report (score per topic, time per
item against its budget, what to review). Every answer also goes into the review log."""

from __future__ import annotations

import random
import uuid
from datetime import datetime
from pathlib import Path

from ..errors import DojoError
from . import drills
from .deck import TRACKS
from .scheduler import utcnow
from .session import Outcome, Stop, Terminal, ask, header


def pick(questions: list[dict], track: str, rng: random.Random, concepts: int, estimates: int) -> list[dict]:
    if track not in TRACKS:
        raise DojoError(f"unknown track {track!r}; tracks are {', '.join(TRACKS)}")
    if concepts < 0 or estimates < 0 or concepts + estimates > 30:
        raise DojoError("--concepts and --estimates are counts from 0, together at most 30")
    pool = [q for q in questions if q["chapter"][:2] in TRACKS[track]]
    chosen = []
    for kind, count in (("concept", concepts), ("estimate", estimates)):
        of_kind = [q for q in pool if q["kind"] == kind]
        chosen += rng.sample(of_kind, min(count, len(of_kind)))
    return chosen


def drill_task(questions: list[dict], track: str, rng: random.Random) -> str:
    named = sorted({q["task"] for q in questions if q.get("task") and q["chapter"][:2] in TRACKS[track]})
    if not named:
        raise DojoError(f"track {track} has no drill")
    return rng.choice(named)


def run(store, term: Terminal, questions: list[dict], track: str, rng: random.Random, concepts: int = 3,
        estimates: int = 2, drill: str | None = "auto", drill_dir: Path = drills.DEFAULT_DIR) -> tuple[str, list]:
    """Run the mock interview; returns (the Markdown report, the rows of its item table)."""
    items = pick(questions, track, rng, concepts, estimates)
    if drill == "auto":
        drill = drill_task(questions, track, rng)
    if drill:
        drills.task(drill)  # an unknown id is refused before the first question, not after the last
    budget = sum(q["minutes"] for q in items) + (drills.minutes_for(drill, questions) if drill else 0)
    session = f"mock-{uuid.uuid4().hex[:8]}"
    started = utcnow()
    total = len(items) + (1 if drill else 0)
    term.say(f"Mock interview, track {track}: {total} items, {budget:g} minutes in all. Ctrl-C stops and "
             "still writes the report.")
    rows = []
    stopped = None
    try:
        for i, q in enumerate(items, 1):
            term.say()
            term.say(header(q, i, total))
            outcome = ask(term, q, rng)
            store.record_review(q, outcome.rating, outcome.seconds, utcnow(), session, outcome.correct, outcome.detail)
            rows.append(_row(outcome))
        if drill:
            rows.append(_drill(store, term, drill, drill_dir, questions, total))
    except Stop as stop:
        stopped = str(stop)
        term.say()
        term.say(f"Stopped ({stop}): {len(rows)} of {total} items answered and saved.")
    return report(track, started, budget, rows, total, stopped), rows


def _row(o: Outcome) -> dict:
    q = o.question
    return {"id": q["id"], "kind": q["kind"], "topic": q["chapter_title"], "tags": q["tags"], "score": o.score,
            "seconds": o.seconds, "budget_s": q["minutes"] * 60, "question": q["question"]}


def _drill(store, term: Terminal, task_id: str, folder: Path, questions: list[dict], total: int) -> dict:
    t = drills.task(task_id)
    term.say()
    term.say(f"[{total}/{total}] drill {task_id}: {t.title}")
    path, minutes = drills.start(store, task_id, folder, None, questions, unique=True)
    term.say(f"Edit {path} in your editor ({minutes:g} minutes). Press Enter here to have it graded.")
    term.ask("> ")
    try:
        result = drills.submit(store, str(path))
    except KeyboardInterrupt:
        raise Stop("interrupted while grading") from None
    except DojoError as err:  # a syntax error: the drill scores 0, the interview goes on
        term.say(f"  {err}")
        result = {"score": 0, "max_score": 1, "in_time": False, "seconds": minutes * 60, "limit_s": minutes * 60}
    else:
        term.say(drills.summary(result))
    score = result["score"] / result["max_score"] if result["in_time"] else 0.0
    return {"id": f"drill {task_id}", "kind": "coding", "topic": t.title, "tags": [t.chapter], "score": score,
            "seconds": result["seconds"], "budget_s": result["limit_s"], "question": f"write `{t.function}`"}


def report(track: str, started: datetime, budget: float, rows: list[dict], total: int, stopped: str | None) -> str:
    spent = sum(r["seconds"] for r in rows)
    overall = sum(r["score"] for r in rows) / len(rows) if rows else 0.0
    lines = [f"# Mock interview: {track}", "",
             f"{started:%Y-%m-%d %H:%M} UTC. Score {overall:.0%} over {len(rows)} of {total} items; "
             f"time {drills.clock(spent)} against a budget of {budget:g} minutes."]
    if stopped:
        lines += ["", f"Stopped before the end ({stopped}); unanswered items are not scored."]
    lines += ["", "## Score by topic", "", "| topic | items | score |", "|---|---:|---:|"]
    topics: dict[str, list[float]] = {}
    for r in rows:
        topics.setdefault(r["topic"], []).append(r["score"])
    for topic, scores in sorted(topics.items(), key=lambda t: sum(t[1]) / len(t[1])):
        lines.append(f"| {topic} | {len(scores)} | {sum(scores) / len(scores):.0%} |")
    lines += ["", "## Items", "", "| # | item | kind | score | time | budget |", "|---:|---|---|---:|---:|---:|"]
    for i, r in enumerate(rows, 1):
        late = " (over)" if r["seconds"] > r["budget_s"] else ""
        lines.append(f"| {i} | {r['id']} | {r['kind']} | {r['score']:.0%} | {drills.clock(r['seconds'])}{late} | "
                     f"{drills.clock(r['budget_s'])} |")
    weak = [r for r in rows if r["score"] < 0.7]
    lines += ["", "## What to review", ""]
    if not weak:
        lines.append("Nothing scored under 70%: try a harder track, or `practice review` for due cards.")
    for r in weak:
        text = " ".join(r["question"].split())
        text = text if len(text) <= 100 else text[:97] + "..."
        lines.append(f"- **{r['id']}** ({r['score']:.0%}, tags {', '.join(r['tags'])}): {text}")
    return "\n".join(lines) + "\n"
