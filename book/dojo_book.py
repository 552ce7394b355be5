"""The book's own Sphinx extension.

- Each lesson page gets its download links and, at its end, the chapter's interview
  questions from book/questions/NN_topic.yaml, answers folded until opened. The cells are
  added to the notebook as Sphinx reads it (the file on disk is untouched, and MyST-NB's
  cache keys on code cells, so adding questions does not execute a lesson again).
- Math is converted to MathML at build time (latex2mathml): the browser lays it out
  itself and reading a page fetches nothing. Sphinx's own choices here load MathJax from a
  CDN or need a LaTeX installation.
- A lesson that fails to execute stops the build, naming the notebook and the cell; a
  malformed question bank stops it naming the file and the entry.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from docutils import nodes
from sphinx.errors import ExtensionError

BOOK = Path(__file__).resolve().parent
ROOT = BOOK.parent
LESSON = re.compile(r"^lessons/(\d\d_\w+)$")


def _banks(app) -> dict:
    from reference_engine.questions import BankError, bank_paths, load_bank

    banks = {}
    for path in bank_paths(Path(app.config.dojo_questions_dir)):
        try:
            banks[path.stem] = load_bank(path)
        except BankError as err:
            raise ExtensionError(f"malformed question bank: {err}") from None
        if not (Path(app.srcdir) / "lessons" / f"{path.stem}.ipynb").exists():
            raise ExtensionError(f"{path} has no lesson: write lessons/{path.stem}.ipynb (its page holds the questions)")
    return banks


def questions_markdown(bank: dict) -> str:
    parts = [f"## Question bank: {bank['title']}",
             f"The chapter's {len(bank['questions'])} interview questions. Try each one first, "
             "then open it to see a model answer and the key points a good answer covers. "
             f"`python -m reference_engine practice review --chapter {bank['chapter'][:2]}` asks them on a "
             "spaced schedule, with fresh numbers in the estimates."]
    for q in bank["questions"]:
        title = " ".join(q["question"].split())
        points = "\n".join(f"- {p}" for p in q["key_points"])
        drill = f"\n\nDrill it, timed and graded: `practice drill start {q['task']}`." if q.get("task") else ""
        parts.append(f"::::{{dropdown}} {q['kind'].upper()} · {title}\n:name: q{q['id']}\n"
                     f":class-container: dojo-question\n\n{q['answer'].strip()}\n\n"
                     f"**Key points** ({q['difficulty']}, {q['minutes']} min):\n\n{points}{drill}\n::::")
    return "\n\n".join(parts)


def downloads_markdown(stem: str, srcdir: Path, exercises: Path) -> str:
    exercise = exercises / f"{stem}.ipynb"
    if not exercise.exists():
        raise ExtensionError(f"lessons/{stem}.ipynb has no exercise {exercise}: every chapter links its graded "
                             "exercise (make exercises writes them from solutions/)")
    return (f"Download {{download}}`this lesson as a notebook <{stem}.ipynb>` and "
            f"{{download}}`the chapter's graded exercise </{os.path.relpath(exercise, srcdir)}>`.")


def add_chapter_cells(app, docname: str, source: list) -> None:
    match = LESSON.match(docname)
    if not match:
        return
    stem = match.group(1)
    nb = json.loads(source[0])
    # "/" is the source folder: a path relative to the lesson would go through book/lessons' link
    downloads = downloads_markdown(stem, Path(app.srcdir), Path(app.config.dojo_exercises_dir))
    nb["cells"][1:1] = [_markdown_cell("dojo-downloads", downloads)]  # under the title
    bank = app.dojo_banks.get(stem)
    if bank:
        app.env.note_dependency(str(Path(app.config.dojo_questions_dir) / f"{stem}.yaml"))  # edited: read again
        nb["cells"].append(_markdown_cell("dojo-questions", questions_markdown(bank)))
    source[0] = json.dumps(nb)


def _markdown_cell(cell_id: str, text: str) -> dict:
    return {"cell_type": "markdown", "id": cell_id, "metadata": {}, "source": text}


def load_banks(app, env, docnames) -> None:
    app.dojo_banks = _banks(app)
    # a bank written for a lesson read before it existed: read that lesson again
    known = getattr(env, "dojo_bank_stems", set())
    for stem in set(app.dojo_banks) - known:
        if f"lessons/{stem}" in env.found_docs and f"lessons/{stem}" not in docnames:
            docnames.append(f"lessons/{stem}")
    env.dojo_bank_stems = set(app.dojo_banks)


def read_every_lesson_when_chapters_change(app, env, added, changed, removed) -> list[str]:
    """Every page's sidebar lists all chapters: when a lesson comes, goes or changes (its
    title may have), read them all again so that every page is written anew. Their
    execution comes from the cache."""
    if any(LESSON.match(d) for d in (*added, *changed, *removed)):
        return sorted(d for d in env.found_docs if LESSON.match(d) or d == app.config.root_doc)
    return []


def stop_on_failed_lesson(app, doctree) -> None:
    """MyST-NB records an execution failure and renders the page anyway; refuse that."""
    from myst_nb.sphinx_ import NbMetadataCollector

    docname = app.env.docname
    data = NbMetadataCollector.get_exec_data(app.env, docname) if LESSON.match(docname) else None
    if not data or data.get("succeeded", True):
        return
    traceback = data.get("traceback") or data.get("error") or "unknown error"
    path = Path(app.srcdir) / f"{docname}.ipynb"
    (Path(app.outdir) / f"{docname}.html").unlink(missing_ok=True)  # no page left from an earlier build
    raise ExtensionError(f"{docname}.ipynb failed to execute, {failing_cell(path, traceback)}:\n"
                         f"{_last_lines(traceback, 12)}\nFix the lesson (run it in Jupyter) and build again.")


def failing_cell(path: Path, traceback: str) -> str:
    """Which code cell failed: nbclient's error quotes the cell's source between dashed
    lines (its time-out, only the first lines)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    sources = ["".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in code]
    timed_out = "CellTimeoutError" in traceback
    quoted = re.search(r"-{18,}\n(.*?)\n-{18,}", traceback, re.S)
    text = quoted.group(1).strip() if quoted else ""
    match = next((i for i, s in enumerate(sources) if text and (s.strip() == text or
                                                                  (timed_out and s.strip().startswith(text)))), None)
    if match is None:
        return "a code cell (see the traceback)"
    cell_id = code[match].get("id", "")
    return (f"code cell {match + 1} of {len(code)}" + (" (it timed out)" if timed_out else "") +
            (f", id {cell_id}" if cell_id else ""))


def _last_lines(text: str, n: int) -> str:
    clean = re.sub(r"\x1b\[[0-9;]*m", "", text)  # ANSI colours from the kernel's traceback
    return "\n".join(clean.rstrip().splitlines()[-n:])


def _mathml(latex: str, display: bool) -> str:
    from latex2mathml.converter import convert

    try:
        return convert(latex.strip(), display="block" if display else "inline")
    except Exception as err:  # latex2mathml raises several types for what it cannot read
        raise ExtensionError(f"math that cannot be converted to MathML: {latex!r} ({err})") from None


def visit_math(self, node) -> None:
    self.body.append(_mathml(node.astext(), display=False))
    raise nodes.SkipNode


def visit_displaymath(self, node) -> None:
    self.body.append(f'<div class="math-block">{_mathml(node.astext(), display=True)}</div>')
    raise nodes.SkipNode


def setup(app):
    app.add_config_value("dojo_questions_dir", str(BOOK / "questions"), "env")
    app.add_config_value("dojo_exercises_dir", str(ROOT / "exercises"), "env")
    app.add_html_math_renderer("mathml", (visit_math, None), (visit_displaymath, None))
    app.connect("env-before-read-docs", load_banks)
    app.connect("env-get-outdated", read_every_lesson_when_chapters_change)
    app.connect("source-read", add_chapter_cells)
    app.connect("doctree-read", stop_on_failed_lesson)
    return {"version": "1", "parallel_read_safe": False, "parallel_write_safe": True}
