"""Where the learner stands: cards due, recall, the weakest tags, drill history, and a PNG
of reviews over time and the coming due dates."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime, timedelta
from pathlib import Path

from .scheduler import retrievability


def summarize(store, questions: list[dict], now: datetime) -> dict:
    cards = store.cards()
    reviews = store.reviews()
    known = {q["id"]: q for q in questions}
    due = sum(1 for c in cards.values() if datetime.fromisoformat(c["due"]) <= now)
    recalled = [r["rating"] > 1 for r in reviews]
    recent = [r["rating"] > 1 for r in reviews if datetime.fromisoformat(r["reviewed_at"]) >= now - timedelta(days=30)]
    by_tag: dict[str, list[bool]] = defaultdict(list)
    for r in reviews:
        for tag in known.get(r["question_id"], {}).get("tags", []):
            by_tag[tag].append(r["rating"] > 1)
    weakest = sorted(((tag, sum(v) / len(v), len(v)) for tag, v in by_tag.items()), key=lambda t: (t[1], -t[2]))[:5]
    memory = [retrievability(c["state"], now) for c in cards.values()]
    drills = [dict(s) for s in store.submissions()]
    return {
        "questions": len(questions), "cards": len(cards), "new": len(questions) - len(set(cards) & set(known)),
        "due_now": due, "reviews": len(reviews),
        "recall_rate": sum(recalled) / len(recalled) if recalled else None,
        "recall_rate_30d": sum(recent) / len(recent) if recent else None,
        "predicted_retention": sum(memory) / len(memory) if memory else None,
        "changed": sum(1 for c in cards.values() if c["changed"]),
        "weakest_tags": [{"tag": t, "recall": r, "reviews": n} for t, r, n in weakest],
        "drills": [{"task": d["task"], "score": d["score"], "max_score": d["max_score"], "seconds": round(d["seconds"]),
                    "in_time": d["seconds"] <= d["limit_s"], "hints": d["hints"], "at": d["submitted_at"][:16]}
                   for d in drills],
        "due_next_14_days": _forecast(cards, now),
        "reviews_per_day": dict(sorted(Counter(r["reviewed_at"][:10] for r in reviews).items())),
    }


def _forecast(cards: dict, now: datetime) -> list[int]:
    days = [0] * 14
    for c in cards.values():
        ahead = (datetime.fromisoformat(c["due"]) - now).days
        if ahead < 14:
            days[max(ahead, 0)] += 1
    return days


def format_stats(s: dict) -> str:
    pct = lambda x: "-" if x is None else f"{x:.0%}"  # noqa: E731
    lines = [f"Cards: {s['cards']} seen of {s['questions']} questions ({s['new']} new); due now: {s['due_now']}"
             + (f"; {s['changed']} changed since last answered" if s["changed"] else ""),
             f"Reviews: {s['reviews']}; recalled {pct(s['recall_rate'])} (last 30 days {pct(s['recall_rate_30d'])}); "
             f"predicted retention now {pct(s['predicted_retention'])}",
             "Due in the next 14 days: " + " ".join(str(n) for n in s["due_next_14_days"])]
    if s["weakest_tags"]:
        lines.append("Weakest tags: " + ", ".join(f"{t['tag']} {t['recall']:.0%} of {t['reviews']}"
                                                  for t in s["weakest_tags"]))
    if s["drills"]:
        lines.append("Drills:")
        for d in s["drills"][-10:]:
            late = "" if d["in_time"] else ", over time"
            lines.append(f"  {d['at']}  {d['task']:>4}  {d['score']}/{d['max_score']}  {d['seconds'] // 60}:"
                         f"{d['seconds'] % 60:02d}{late}, {d['hints']} hints")
    return "\n".join(lines)


def plot(s: dict, path: Path) -> Path:
    """Reviews per day and the due forecast, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    days = list(s["reviews_per_day"])
    left.bar(range(len(days)), list(s["reviews_per_day"].values()), color="tab:blue")
    left.set_xticks(range(len(days)), [d[5:] for d in days], rotation=45, fontsize=8)
    left.set_title("reviews per day")
    right.bar(range(14), s["due_next_14_days"], color="tab:orange")
    right.set_xlabel("days from now")
    right.set_title("cards due")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
