"""Build the book: one HTML page per lesson (executed, so its numbers and plots are fresh)
with the chapter's interview questions, answers hidden until clicked.

    python book/build.py [--out book/_build] [--no-execute]

Everything is rendered at build time and nothing is fetched when reading: math becomes
MathML (drawn by the browser itself), plots are embedded PNGs, styles are inline.
Open book/_build/index.html.
"""

from __future__ import annotations

import argparse
import html
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"(```.*?```|`[^`\n]+`)", re.S)
DISPLAY_MATH = re.compile(r"\$\$(.+?)\$\$", re.S)
INLINE_MATH = re.compile(r"(?<![\\$])\$(?!\$)(.+?)(?<!\\)\$")

STYLE = """
body { font-family: Georgia, serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.55; color: #222; }
nav { font-family: sans-serif; font-size: 0.9rem; margin-bottom: 2rem; }
pre { background: #f6f6f4; padding: 0.7rem; overflow-x: auto; font-size: 0.85rem; }
pre.output { background: #fff; border-left: 3px solid #ccc; }
img { max-width: 100%; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 0.2rem 0.5rem; }
details { border: 1px solid #ddd; border-radius: 4px; padding: 0.4rem 0.8rem; margin: 0.6rem 0; }
details summary { cursor: pointer; font-weight: bold; }
.kind { font-family: sans-serif; font-size: 0.75rem; color: #777; text-transform: uppercase; }
math[display="block"] { margin: 0.8rem 0; }
"""
# Records, once the page has loaded, how many images decoded, whether a fraction laid out
# as one (numerator above denominator) and how many answers are hidden: the book's test
# reads these from the DOM.
SELF_CHECK = """
<script>
window.addEventListener("load", () => {
  const images = [...document.images].filter(i => i.complete && i.naturalWidth > 0).length;
  const frac = document.querySelector("mfrac");
  let stacked = false;
  if (frac && frac.children.length === 2) {
    const [top, bottom] = [...frac.children].map(e => e.getBoundingClientRect());
    stacked = top.bottom <= bottom.top + 1 && top.height > 0;
  }
  const answers = [...document.querySelectorAll("details.question .answer")];
  document.body.dataset.imagesRendered = images;
  document.body.dataset.fractionStacked = stacked;
  document.body.dataset.answersHidden = answers.filter(a => !a.checkVisibility()).length;
});
</script>
"""


def markdown_with_math(text: str) -> str:
    """Markdown to HTML, with $...$ and $$...$$ turned into MathML (code left alone)."""
    import markdown
    from latex2mathml.converter import convert

    stash = []

    def keep(html_text: str) -> str:
        stash.append(html_text)
        return f"MATHSTASH{len(stash) - 1}X"

    parts = FENCE.split(text)
    for i in range(0, len(parts), 2):  # even parts are outside code
        parts[i] = DISPLAY_MATH.sub(lambda m: keep(convert(m.group(1).strip(), display="block")), parts[i])
        parts[i] = INLINE_MATH.sub(lambda m: keep(convert(m.group(1).strip())), parts[i])
    rendered = markdown.markdown("".join(parts), extensions=["fenced_code", "tables"])
    return re.sub(r"MATHSTASH(\d+)X", lambda m: stash[int(m.group(1))], rendered)


def execute(notebook):
    from nbclient import NotebookClient

    NotebookClient(notebook, timeout=600, kernel_name="python3").execute()
    return notebook


def render_outputs(cell) -> str:
    out = []
    for o in cell.get("outputs", []):
        data = o.get("data", {})
        if o.get("output_type") == "error":
            raise RuntimeError(f"a lesson cell failed: {o.get('ename')}: {o.get('evalue')}")
        if "image/png" in data:
            out.append(f'<img alt="plot" src="data:image/png;base64,{data["image/png"].strip()}">')
        elif o.get("output_type") == "stream":
            out.append(f'<pre class="output">{html.escape(o["text"])}</pre>')
        elif "text/plain" in data:
            out.append(f'<pre class="output">{html.escape(data["text/plain"])}</pre>')
    return "\n".join(out)


def render_questions(stem: str) -> str:
    import yaml

    path = ROOT / "book" / "questions" / f"{stem}.yaml"
    if not path.exists():
        return ""
    bank = yaml.safe_load(path.read_text())
    items = [f'<h2 id="questions">Interview questions: {html.escape(bank["title"])}</h2>',
             "<p>Try each question first; click it to see a model answer.</p>"]
    for q in bank["questions"]:
        items.append(
            f'<details class="question" id="q{q["id"]}"><summary><span class="kind">{q["kind"]}</span> '
            f'{markdown_with_math(q["question"]).removeprefix("<p>").removesuffix("</p>")}</summary>'
            f'<div class="answer">{markdown_with_math(q["answer"])}</div></details>')
    return "\n".join(items)


def page(title: str, body: str, chapters: list[tuple[str, str]]) -> str:
    nav = " · ".join(f'<a href="{stem}.html">{html.escape(t)}</a>' for stem, t in chapters)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n<nav><a href=\"index.html\">Inference Dojo</a> · {nav}</nav>\n"
            f"{body}\n{SELF_CHECK}</body></html>\n")


def lesson_title(notebook) -> str:
    first = next(c for c in notebook.cells if c.cell_type == "markdown")
    return first.source.splitlines()[0].lstrip("# ").strip()


def read_lessons() -> dict:
    """{stem: notebook} for every lesson, in chapter order, as committed (no outputs)."""
    import nbformat

    return {p.stem: nbformat.read(p, as_version=4) for p in sorted((ROOT / "lessons").glob("*.ipynb"))}


def build(out: Path, run: bool = True, notebooks: dict | None = None) -> list[Path]:
    """Write the book into `out`. notebooks: lessons already executed (as `read_lessons`
    returns them, then run), rendered as they are; by default each lesson is read and,
    with `run`, executed here."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    if notebooks is None:
        notebooks = read_lessons()
        if run:
            for nb in notebooks.values():
                execute(nb)
    # a chapter whose question bank is written before its lesson gets a page of questions
    banks_only = {p.stem: yaml.safe_load(p.read_text())["title"] for p in sorted((ROOT / "book" / "questions").glob("*.yaml"))
                  if p.stem not in notebooks}
    chapters = sorted([(stem, lesson_title(nb)) for stem, nb in notebooks.items()] +
                      [(stem, f"Chapter {int(stem[:2])} — {title} (questions)") for stem, title in banks_only.items()])
    written = []
    for stem, title in banks_only.items():
        target = out / f"{stem}.html"
        heading = f"<h1>Chapter {int(stem[:2])} — {html.escape(title)}</h1>"
        target.write_text(page(title, heading + render_questions(stem), chapters), encoding="utf-8")
        written.append(target)
    for stem, nb in notebooks.items():
        parts = []
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                parts.append(markdown_with_math(cell.source))
            elif cell.cell_type == "code":
                parts.append(f'<pre><code class="language-python">{html.escape(cell.source)}</code></pre>')
                parts.append(render_outputs(cell))
        parts.append(render_questions(stem))
        target = out / f"{stem}.html"
        target.write_text(page(lesson_title(nb), "\n".join(parts), chapters), encoding="utf-8")
        written.append(target)
    links = "\n".join(f'<li><a href="{stem}.html">{html.escape(t)}</a></li>' for stem, t in chapters)
    index = ("<h1>Inference Dojo</h1><p>Making LLM inference fast, measured on a real model. "
             f"Each chapter ends with interview questions (answers hidden until clicked).</p><ol>{links}</ol>")
    (out / "index.html").write_text(page("Inference Dojo", index, chapters), encoding="utf-8")
    return [out / "index.html", *written]


def main() -> int:
    parser = argparse.ArgumentParser(description="Build the Inference Dojo book as static HTML.")
    parser.add_argument("--out", default=str(ROOT / "book" / "_build"))
    parser.add_argument("--no-execute", action="store_true", help="render lessons without running them")
    args = parser.parse_args()
    for path in build(Path(args.out), run=not args.no_execute):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
