"""Building the book (`python -m reference_engine book`, `make book`): Sphinx with MyST-NB
over lessons/ and book/questions/, configured in book/conf.py and book/dojo_book.py.

Sphinx reports a stopped build with a page of versions and a traceback addressed to its own
developers; here a stopped build is one line saying what to fix (the lesson and its cell,
the question bank and its entry)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .errors import DojoError

BOOK_DIR = Path(__file__).resolve().parents[1] / "book"
DEFAULT_OUT = BOOK_DIR / "_build" / "html"


def build_book(out: Path = DEFAULT_OUT, source: Path = BOOK_DIR, execute: bool = True,
               settings: dict | None = None, quiet: bool = False) -> dict:
    """Build the HTML book into `out`. Lessons are executed through MyST-NB's cache (only
    those whose code changed run), or not at all with execute=False (their committed
    outputs, usually none, are shown). Returns {"seconds", "executed", "index"}."""
    import io

    try:
        from sphinx.application import Sphinx
        from sphinx.errors import SphinxError
    except ImportError:
        raise DojoError("the book needs Sphinx and MyST-NB: pip install -e '.[book]'") from None
    if not (BOOK_DIR / "conf.py").exists():
        raise DojoError(f"{BOOK_DIR / 'conf.py'} not found: the book is built from a clone of the repository")
    overrides = dict(settings or {})
    if not execute:
        overrides["nb_execution_mode"] = "off"
    out = Path(out)
    # After a stopped build, read everything again: Sphinx would otherwise skip the pages
    # whose warnings stopped it, and the next build would pass without showing them.
    failed = out.parent / ".last-build-failed"
    started = time.time()
    try:
        app = Sphinx(str(source), str(BOOK_DIR), str(out), str(out.parent / "doctrees"), "html",
                     confoverrides=overrides, status=io.StringIO() if quiet else sys.stdout, warningiserror=True,
                     freshenv=failed.exists())
        cached = _cache_records(app)
        failed.parent.mkdir(parents=True, exist_ok=True)
        failed.touch()
        app.build()
    except SphinxError as err:
        raise DojoError(f"the book was not built: {err}") from None
    if app.statuscode:
        raise DojoError("the book was not built: fix the warnings above (Sphinx treats them as errors here)")
    failed.unlink()
    executed = len(set(_cache_records(app).items()) - set(cached.items()))
    return {"seconds": time.time() - started, "executed": executed, "index": out / "index.html"}


def _cache_records(app) -> dict:
    """{record id: when it was stored} of MyST-NB's execution cache: a lesson executed by
    a build is a record that is new or stored again."""
    if app.config.nb_execution_mode != "cache":
        return {}
    from jupyter_cache import get_cache

    return {r.pk: r.created for r in get_cache(app.config.nb_execution_cache_path).list_cache_records()}
