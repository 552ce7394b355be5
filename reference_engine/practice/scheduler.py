"""Spaced review: when each card is due again, by FSRS (the `fsrs` package, version 6),
behind an interface of our own: a card's state is a JSON string, a review is (rating, when).

The review log is the truth and the card states are derived from it, so `replay` can
rebuild every state from the log if the scheduler or its parameters change (or when two
machines' logs are merged by `practice import`). Fuzzing is off so that a replay gives the
same due dates as the reviews did.
"""

from __future__ import annotations

from datetime import datetime, timezone

RATINGS = {1: "again", 2: "hard", 3: "good", 4: "easy"}
DESIRED_RETENTION = 0.9


def _scheduler():
    from fsrs import Scheduler

    return Scheduler(desired_retention=DESIRED_RETENTION, enable_fuzzing=False)


def new_state() -> str:
    """A card never reviewed: due now."""
    from fsrs import Card

    return Card(card_id=1).to_json()


def review(state: str, rating: int, when: datetime) -> tuple[str, datetime]:
    """The card's state after a review rated 1 (again) .. 4 (easy) at `when`, and its next due time."""
    from fsrs import Card, Rating

    if rating not in RATINGS:
        raise ValueError(f"a rating is 1 (again), 2 (hard), 3 (good) or 4 (easy), not {rating!r}")
    card, _ = _scheduler().review_card(Card.from_json(state), Rating(rating), review_datetime=when)
    return card.to_json(), card.due


def replay(reviews: list[tuple[int, datetime]]) -> tuple[str, datetime]:
    """The state a card reaches after these (rating, when) reviews, in time order."""
    state, due = new_state(), None
    for rating, when in sorted(reviews, key=lambda r: r[1]):
        state, due = review(state, rating, when)
    return state, due


def retrievability(state: str, now: datetime) -> float:
    """The probability of recalling the card now, by FSRS's forgetting curve (0 if never reviewed)."""
    from fsrs import Card

    card = Card.from_json(state)
    if card.last_review is None:
        return 0.0
    return float(_scheduler().get_card_retrievability(card, now))


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
