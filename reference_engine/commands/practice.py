"""Interview practice: `practice review|estimate|drill|mock|stats|tags|export|import`."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from ..errors import DojoError

EXAMPLES = """examples:
  python -m reference_engine practice review --chapter 3 --new 5
  python -m reference_engine practice estimate --tag kv-cache
  python -m reference_engine practice drill start 1.1     (then edit the file, and:)
  python -m reference_engine practice drill submit
  python -m reference_engine practice mock compression
  python -m reference_engine practice stats --plot stats.png
  python -m reference_engine practice classifier          (the drills' classifier, fp32 against int8)"""


def add_commands(sub) -> None:
    import argparse

    pr = sub.add_parser("practice", help="interview practice: spaced review, estimates, timed drills, mock interviews",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("--db", metavar="PATH", help="the practice database (default: $DOJO_PRACTICE_DB, else the "
                                                 "user data folder)")
    act = pr.add_subparsers(dest="action", required=True, metavar="ACTION")

    def filters(p):
        p.add_argument("--chapter", action="append", default=[], metavar="C", help="1, 03 or 03_decoding_kv_cache "
                                                                                 "(repeatable; default all)")
        p.add_argument("--tag", action="append", default=[], metavar="TAG", help="only questions with this tag "
                                                                                 "(repeatable; `practice tags`)")
        p.add_argument("--seed", type=int, help="seed for the fresh numbers and the order (default: random)")

    rv = act.add_parser("review", help="due cards from every chapter's question bank, scheduled by FSRS")
    filters(rv)
    rv.add_argument("--kind", action="append", default=[], choices=["concept", "estimate", "coding"])
    rv.add_argument("--new", type=int, default=10, metavar="N", help="new cards to add to the due ones (default 10)")
    rv.add_argument("--limit", type=int, metavar="N", help="stop after N cards")
    es = act.add_parser("estimate", help="back-of-the-envelope estimates with fresh numbers, checked")
    filters(es)
    es.add_argument("--count", type=int, default=5, metavar="N", help="how many (default 5)")
    dr = act.add_parser("drill", help="timed coding drills graded by the trusted grader")
    dact = dr.add_subparsers(dest="drill_action", required=True, metavar="STEP")
    dact.add_parser("list", help="the tasks that can be drilled, with their time limits")
    st = dact.add_parser("start", help="write the task's stub to a file and start the clock")
    st.add_argument("task", help="a task id, for example 1.1 (`practice drill list`)")
    st.add_argument("--minutes", type=float, help="time limit (default: the bank's budget for it, else 20)")
    st.add_argument("--out", default="dojo-drills", help="folder for the drill file (default dojo-drills)")
    for name, what in (("hint", "the next hint for the drill (recorded)"),
                       ("submit", "grade the drill file with the trusted grader and record the time")):
        p = dact.add_parser(name, help=what)
        p.add_argument("path", nargs="?", help="the drill file (default: the latest drill started)")
    mk = act.add_parser("mock", help="a timed mock interview on one track, ending with a Markdown report")
    mk.add_argument("track", help="attention-decoding, compression or systems-serving")
    mk.add_argument("--concepts", type=int, default=3)
    mk.add_argument("--estimates", type=int, default=2)
    mk.add_argument("--drill", default="auto", help="task id of the drill, 'auto' (default) or 'none'")
    mk.add_argument("--out", default="dojo-drills", help="folder for the drill file")
    mk.add_argument("--report", metavar="PATH", help="where to write the report (default mock-TRACK-TIME.md)")
    mk.add_argument("--seed", type=int)
    sa = act.add_parser("stats", help="cards due, recall, weakest tags, drill history")
    sa.add_argument("--json", action="store_true")
    sa.add_argument("--plot", metavar="PNG", help="also write reviews per day and the due forecast to this PNG")
    act.add_parser("tags", help="every tag with its number of questions")
    cl = act.add_parser("classifier", help="the drills' text classifier end to end with an fp32 and an int8 backbone: "
                                           "held-out accuracy and texts per second, measured side by side")
    cl.add_argument("--seed", type=int, default=0, help="which held-out split (default 0)")
    cl.add_argument("--json", action="store_true")
    ex = act.add_parser("export", help="write the practice history to a JSON file")
    ex.add_argument("file")
    im = act.add_parser("import", help="merge an exported history into this database")
    im.add_argument("file")


def cmd_practice(args) -> int:
    from ..practice.deck import all_questions
    from ..practice.store import Store

    if getattr(args, "limit", None) is not None and args.limit < 1 or getattr(args, "count", 1) < 1:
        raise DojoError("--limit and --count must be at least 1")
    questions = all_questions()
    store = Store(Path(args.db) if args.db else None)
    try:
        store.sync(questions)
        return ACTIONS[args.action](args, store, questions)
    finally:
        store.close()


def _rng(args) -> random.Random:
    return random.Random(args.seed)


def _review(args, store, questions) -> int:
    from ..practice import deck, session
    from ..practice.scheduler import utcnow

    picked = deck.select(questions, args.chapter, args.kind, args.tag)
    items = deck.queue(picked, store.cards(), utcnow(), args.new, args.limit)
    done = session.review(store, items, session.Terminal(), _rng(args))
    return 0 if len(done) == len(items) else 130


def _estimate(args, store, questions) -> int:
    from ..practice import deck, session

    rng = _rng(args)
    picked = deck.select(questions, args.chapter, ["estimate"], args.tag)
    # without repeats while the pool lasts (each draw has fresh numbers anyway)
    items = [q for _ in range(-(-args.count // len(picked))) for q in rng.sample(picked, len(picked))][:args.count]
    done = session.review(store, items, session.Terminal(), rng)
    return 0 if len(done) == len(items) else 130


def _drill(args, store, questions) -> int:
    from ..practice import drills

    if args.drill_action == "list":
        for t in drills.tasks().values():
            print(f"{t.id:>4}  {drills.minutes_for(t.id, questions):>4g} min  {t.title}")
        return 0
    if args.drill_action == "start":
        path, minutes = drills.start(store, args.task, Path(args.out), args.minutes, questions)
        print(f"Drill {args.task} started: {minutes:g} minutes from now.\nEdit {path} in your editor, then:\n"
              f"  python -m reference_engine practice drill submit {path}")
        return 0
    if args.drill_action == "hint":
        print(drills.hint(store, args.path))
        return 0
    from ..grading.report import live_progress

    result = drills.submit(store, args.path, live=live_progress(None))
    print(result["report"])
    print(drills.summary(result))
    return 0 if result["passed"] and result["in_time"] else 1


def _mock(args, store, questions) -> int:
    from ..practice import mock, session
    from ..practice.scheduler import utcnow

    drill = None if args.drill == "none" else args.drill
    path = Path(args.report or f"mock-{args.track}-{utcnow():%Y%m%d-%H%M%S}.md")
    if not path.parent.is_dir():  # found out now, not after the interview
        raise DojoError(f"--report {path}: the folder {path.parent} does not exist")
    text, rows = mock.run(store, session.Terminal(), questions, args.track, _rng(args), args.concepts,
                          args.estimates, drill, Path(args.out))
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as err:
        print(text)
        raise DojoError(f"cannot write the report to {path} ({err.strerror}); it is printed above") from None
    print(f"\nReport written to {path}")
    return 0


def _stats(args, store, questions) -> int:
    from ..practice.scheduler import utcnow
    from ..practice.stats import format_stats, plot, summarize

    s = summarize(store, questions, utcnow())
    print(json.dumps(s) if args.json else format_stats(s))
    if args.plot:
        if not Path(args.plot).parent.is_dir():
            raise DojoError(f"--plot {args.plot}: the folder {Path(args.plot).parent} does not exist")
        from importlib.util import find_spec

        if find_spec("matplotlib") is None:
            raise DojoError("--plot needs matplotlib: pip install matplotlib")
        print(f"Plot written to {plot(s, Path(args.plot))}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _classifier(args, store, questions) -> int:
    from tqdm import tqdm

    from ..practice.classifier import format_measure, measure

    with tqdm(total=2, desc="fp32 and int8 backbones", unit="model", disable=None) as bar:
        rows = measure(args.seed, progress=lambda name: bar.update(1))
    print(json.dumps(rows) if args.json else format_measure(rows))
    return 0


def _tags(args, store, questions) -> int:
    from collections import Counter

    counts = Counter(t for q in questions for t in q["tags"])
    for tag, n in sorted(counts.items()):
        print(f"{tag:28} {n}")
    return 0


def _export(args, store, questions) -> int:
    counts = store.export(Path(args.file))
    print(f"Exported {counts['reviews']} reviews, {counts['drills']} drills and {counts['submissions']} "
          f"submissions to {args.file}")
    return 0


def _import(args, store, questions) -> int:
    added = store.import_(Path(args.file))
    print(f"Imported {added['reviews']} new reviews, {added['drills']} drills and {added['submissions']} "
          f"submissions from {args.file} (rows already here were skipped); cards replayed from the log.")
    return 0


ACTIONS = {"review": _review, "estimate": _estimate, "drill": _drill, "mock": _mock, "stats": _stats,
           "tags": _tags, "classifier": _classifier, "export": _export, "import": _import}
COMMANDS = {"practice": cmd_practice}
