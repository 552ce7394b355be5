"""The interactive loops: a learner at a terminal (or a script feeding lines on stdin)
answers concept questions and estimates one at a time. Each answer is saved as soon as it is
rated, so Ctrl-C (or the end of the input) stops the session with everything answered kept.
"""

from __future__ import annotations

import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from .estimates import draw, parse_number
from .render import to_terminal
from .scheduler import RATINGS, utcnow


class Stop(Exception):
    """The learner left: Ctrl-C, or no more input."""


class Terminal:
    """Reads answers and writes text; `input_fn` and `out` are swapped in tests."""

    def __init__(self, input_fn=input, out=None, color: bool | None = None, clock=time.monotonic):
        self.input_fn = input_fn
        self.out = out or sys.stdout
        self.color = self.out.isatty() if color is None else color
        self.clock = clock

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def markdown(self, text: str) -> None:
        self.out.write(to_terminal(text, color=self.color))
        self.out.flush()

    def ask(self, prompt: str) -> str:
        try:
            return self.input_fn(prompt)
        except EOFError:
            raise Stop("input ended") from None
        except KeyboardInterrupt:
            raise Stop("interrupted") from None


@dataclass
class Outcome:
    """One answered item: the rating given to the scheduler, a score in [0, 1], the time."""

    question: dict
    rating: int
    score: float
    seconds: float
    correct: bool | None = None
    detail: dict = field(default_factory=dict)


def header(q: dict, index: int, total: int) -> str:
    return (f"[{index}/{total}] {q['id']} · {q['kind']} · {q['difficulty']} · budget {q['minutes']} min · "
            f"{q['chapter_title']} · tags: {', '.join(q['tags'])}")


def ask_concept(term: Terminal, q: dict) -> Outcome:
    """Question, the learner's own answer (typed, or in their head), the model answer, the key
    points as a checklist, and the learner's rating (suggested from the points covered)."""
    start = term.clock()
    term.markdown(q["question"])
    term.say("Your answer (finish with an empty line; just Enter to answer in your head):")
    typed = []
    while True:
        line = term.ask("> ")
        if not line.strip():
            break
        typed.append(line)
    seconds = term.clock() - start
    term.say("── Model answer " + "─" * 40)
    term.markdown(q["answer"])
    term.say("Key points:")
    for i, point in enumerate(q["key_points"], 1):
        term.say(f"  {i}. {point}")
    if q.get("task"):
        term.say(f"Drill it with the grader: python -m reference_engine practice drill start {q['task']}")
    covered = ask_points(term, len(q["key_points"]))
    suggested = None if covered is None else 3 if covered >= 0.8 else 2 if covered >= 0.5 else 1
    rating = ask_rating(term, suggested)
    score = covered if covered is not None else (rating - 1) / 3
    return Outcome(q, rating, score, seconds, detail={"typed": "\n".join(typed), "covered": covered})


def ask_points(term: Terminal, count: int) -> float | None:
    """The fraction of key points the learner says they covered (None if they skip)."""
    while True:
        reply = term.ask("Which key points did you cover? (numbers such as 1 3, 'all', 'none'; Enter to skip) ")
        text = reply.strip().lower().replace(",", " ")
        if not text:
            return None
        if text == "all":
            return 1.0
        if text == "none":
            return 0.0
        try:
            picked = {int(t) for t in text.split()}
        except ValueError:
            term.say(f"  {reply.strip()!r}: type point numbers from 1 to {count}, 'all' or 'none'")
            continue
        if not picked <= set(range(1, count + 1)):
            term.say(f"  there are {count} key points; type numbers from 1 to {count}")
            continue
        return len(picked) / count


def ask_rating(term: Terminal, suggested: int | None) -> int:
    choices = ", ".join(f"{k} {v}" for k, v in RATINGS.items())
    default = f" [Enter: {suggested} {RATINGS[suggested]}]" if suggested else ""
    while True:
        reply = term.ask(f"How well did you recall it? {choices}{default}: ").strip().lower()
        if not reply and suggested:
            return suggested
        by_name = {v: k for k, v in RATINGS.items()}
        if reply in by_name:
            return by_name[reply]
        if reply.isdigit() and int(reply) in RATINGS:
            return int(reply)
        term.say(f"  type 1, 2, 3 or 4 ({choices})")


def ask_estimate(term: Terminal, q: dict, rng: random.Random) -> Outcome:
    """A fresh instance of the template; the typed number judged within the tolerance, the
    mistake named when the number matches a common one, the worked steps shown after."""
    est = draw(q, rng)
    start = term.clock()
    term.markdown(est.prompt)
    while True:
        reply = term.ask(f"Your estimate ({est.unit}; within {est.tolerance:.0%}): ")
        try:
            number = parse_number(reply, est.unit)
            break
        except ValueError as err:
            term.say(f"  {err}")
    seconds = term.clock() - start
    verdict = est.judge(number)
    shown = f"{est.answer:,.4g}" if abs(est.answer) < 1000 else f"{est.answer:,.0f}"
    if verdict.correct:
        term.say(f"Correct: {shown} {est.unit} (you: {number:,.6g}, off by {verdict.relative_error:.1%}).")
    else:
        term.say(f"Not quite: the answer is {shown} {est.unit}; you typed {number:,.6g} "
                 f"(off by {verdict.relative_error:.0%}).")
        if verdict.mistake:
            term.say(f"That is the number you get with a common mistake: {verdict.mistake}.")
    term.say("Worked steps:")
    term.markdown(est.steps)
    over = seconds > q["minutes"] * 60
    rating = (2 if over else 3) if verdict.correct else 1
    return Outcome(q, rating, 1.0 if verdict.correct else 0.0, seconds, verdict.correct,
                   {"inputs": est.inputs, "typed": number, "answer": est.answer, "mistake": verdict.mistake})


def ask(term: Terminal, q: dict, rng: random.Random) -> Outcome:
    return ask_estimate(term, q, rng) if q["kind"] == "estimate" else ask_concept(term, q)


def review(store, items: list[dict], term: Terminal, rng: random.Random, session: str | None = None) -> list[Outcome]:
    """Answer each item in turn, saving each one as it is rated. Stops cleanly on Ctrl-C
    or the end of input, saying how many answers were kept."""
    session = session or f"review-{uuid.uuid4().hex[:8]}"
    done: list[Outcome] = []
    if not items:
        term.say("Nothing is due. Come back later, or add new cards with --new N.")
        return done
    try:
        for i, q in enumerate(items, 1):
            term.say()
            term.say(header(q, i, len(items)))
            card = store.card(q["id"])
            if card is not None and card["changed"]:
                term.say("(this question changed since you last answered it; its history is kept)")
            outcome = ask(term, q, rng)
            due = store.record_review(q, outcome.rating, outcome.seconds, utcnow(), session, outcome.correct,
                                      outcome.detail)
            done.append(outcome)
            term.say(f"Saved: {RATINGS[outcome.rating]}; next review {when(due)}.")
    except Stop as stop:
        term.say()
        term.say(f"Stopped ({stop}): {len(done)} answer{'s' * (len(done) != 1)} saved.")
        return done
    term.say()
    term.say(f"Done: {len(done)} answered, {sum(o.rating > 1 for o in done)} recalled.")
    return done


def when(due: datetime) -> str:
    delta = due - utcnow()
    if delta < timedelta(hours=1):
        return f"in {max(delta.total_seconds() / 60, 0):.0f} min"
    if delta < timedelta(days=2):
        return f"in {delta.total_seconds() / 3600:.0f} h"
    return f"in {delta.days} days ({due:%Y-%m-%d})"
