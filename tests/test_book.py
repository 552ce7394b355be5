"""The book builds offline and renders in a real browser: math laid out, plots decoded,
interview answers hidden until clicked."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book"))

import build  # noqa: E402  (book/build.py)

# The lessons time things and run torch on both cores: they run alone (make test's
# first pass), and execute once for both modules (conftest.executed_lessons).
pytestmark = pytest.mark.serial

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def book(tmp_path_factory, executed_lessons):
    out = tmp_path_factory.mktemp("book")
    build.build(out, notebooks={stem: nb for stem, (nb, _) in executed_lessons.items()})
    return out


def test_every_lesson_is_a_self_contained_page(book):
    lessons = sorted(p.stem for p in (ROOT / "lessons").glob("*.ipynb"))
    index = (book / "index.html").read_text()
    for stem in lessons:
        page = (book / f"{stem}.html").read_text()
        assert f'href="{stem}.html"' in index, stem
        assert not re.search(r'(src|href)="https?://', page), f"{stem}: the book must not fetch anything when read"
        assert len(re.findall(r'<img alt="plot" src="data:image/png;base64,', page)) >= 3, stem
        assert page.count("<math") >= 10, stem
        questions = re.findall(r'<details class="question"[^>]*>', page)
        assert len(questions) >= 15 and not any("open" in q for q in questions), stem


def test_a_question_bank_without_its_lesson_still_gets_a_page(book):
    lessons = {p.stem for p in (ROOT / "lessons").glob("*.ipynb")}
    index = (book / "index.html").read_text()
    for bank in (ROOT / "book" / "questions").glob("*.yaml"):
        page = (book / f"{bank.stem}.html").read_text()
        assert f'href="{bank.stem}.html"' in index
        assert len(re.findall(r'<details class="question"[^>]*>', page)) >= 15
        if bank.stem not in lessons:
            assert "(questions)" in index


def test_math_converts_to_mathml_and_code_is_left_alone():
    out = build.markdown_with_math("Cost $O(T^2)$ and `price $5` plus\n\n$$\\frac{a}{b}$$")
    assert "<mfrac>" in out and "<msup>" in out and "<code>price $5</code>" in out


def test_chapter_renders_in_a_browser(book, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "the book's test needs Debian's chromium: apt-get install chromium (make test installs it as root)"
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path}", "--virtual-time-budget=10000",
                          "--dump-dom", (book / "01_attention.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert int(re.search(r'data-images-rendered="(\d+)"', body).group(1)) >= 3, "plots did not decode"
    assert 'data-fraction-stacked="true"' in body, "MathML fractions were not laid out"
    assert int(re.search(r'data-answers-hidden="(\d+)"', body).group(1)) >= 20, "answers must start hidden"
