"""The whole book, built by Sphinx from the lessons as executed in this test session, read
as HTML and in a real browser: a page per chapter with the sidebar, the in-page contents,
highlighted code, the executed plots, MathML laid out, answers hidden until opened,
download links, full-text search, and not one request to another host."""

import re

import pytest

from booktools import RecordingProxy, book_command, chromium_dom, new_source

# The lessons time things and run torch on both cores: they run alone (make test's
# first pass), and execute once for both modules (conftest.executed_lessons).
pytestmark = pytest.mark.serial


@pytest.fixture(scope="module")
def book(tmp_path_factory, executed_lessons):
    tmp = tmp_path_factory.mktemp("book")
    src = new_source(tmp, {stem: nb for stem, (nb, _) in executed_lessons.items()})
    out = tmp / "html"
    # the lessons already ran in this session: render their outputs as they are
    done = book_command(src, out, "nb_execution_mode=off")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def proxy():
    recording = RecordingProxy()
    yield recording
    recording.close()


def lesson_stems(book):
    return sorted(p.stem for p in (book / "lessons").glob("*.html"))


def text_of(html: str) -> str:
    return re.sub(r"<[^>]+>", "", html)


def test_every_lesson_is_a_chapter_page(book, executed_lessons):
    assert lesson_stems(book) == sorted(executed_lessons)
    index = text_of((book / "index.html").read_text())
    assert "make demo" in index and "make test" in index and "python -m reference_engine grade" in index, \
        "the landing page says how to start"
    for stem in executed_lessons:
        page = (book / "lessons" / f"{stem}.html").read_text()
        sidebar = re.search(r'<nav class="[^"]*bd-docs-nav.*?</nav>', page, re.S).group(0)
        others = [other for other in executed_lessons if other != stem]  # its own entry links to "#"
        assert all(f'href="{other}.html"' in sidebar for other in others), f"{stem}: sidebar lists every chapter"
        assert 'class="bd-toc' in page and "page-toc" in page, f"{stem}: in-page contents"
        assert '<div class="highlight-ipython3' in page and '<span class="kn">import</span>' in page, f"{stem}: highlighted code"
        assert "copybutton.js" in page, f"{stem}: copy buttons"
        images = re.findall(r'<img[^>]+src="(\.\./_images/[^"]+\.png)"', page)
        assert len(images) >= 3 and all((book / "lessons" / i).exists() for i in images), f"{stem}: the executed plots"
        assert page.count("<math") >= 10, f"{stem}: math converted to MathML"
        questions = re.findall(r'<details class="[^"]*dojo-question[^"]*"[^>]*>', page)
        assert len(questions) >= 15 and not any(" open" in q for q in questions), f"{stem}: answers start folded"
        assert page.count("<strong>Key points</strong>") == len(questions), f"{stem}: each answer's checklist"
        downloads = re.findall(r'href="(\.\./_downloads/[^"]+\.ipynb)"', page)
        assert len(downloads) == 2 and all((book / "lessons" / d).exists() for d in downloads), f"{stem}: lesson and exercise"


def test_scripts_and_styles_are_served_by_the_book_itself(book):
    for page in [book / "index.html", *sorted((book / "lessons").glob("*.html"))]:
        text = page.read_text()
        assert not re.findall(r'<(?:script|link|img)[^>]+(?:src|href)="(?:https?:)?//', text), page.name


def test_chapter_renders_in_a_browser_and_fetches_nothing(book, proxy, tmp_path):
    before = len(proxy.requests)
    dom = chromium_dom((book / "lessons" / "01_attention.html").as_uri(), tmp_path, proxy)
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert int(re.search(r'data-images-rendered="(\d+)"', body).group(1)) >= 3, "plots did not decode"
    assert 'data-fraction-stacked="true"' in body, "MathML fractions were not laid out"
    assert int(re.search(r'data-answers-hidden="(\d+)"', body).group(1)) >= 20, "answers must start hidden"
    chromium_dom((book / "index.html").as_uri(), tmp_path, proxy)
    external = proxy.external(since=before)
    assert not external, f"opening pages of the book asked other hosts for: {external}"


def test_the_browser_check_catches_a_request_to_another_host(book, proxy, tmp_path):
    """The proxy sees what a page would fetch (so the test above can fail)."""
    before = len(proxy.requests)
    page = book / "lessons" / "leaky.html"
    page.write_text('<html><body><img src="https://cdn.example.org/font.png">x</body></html>')
    try:
        chromium_dom(page.as_uri(), tmp_path, proxy)
    finally:
        page.unlink()
    assert any("cdn.example.org" in r for r in proxy.external(since=before))


def test_search_finds_the_one_chapter_with_a_term(book, proxy, tmp_path):
    term = "goodput"  # appears in chapter 9's lesson and nowhere else in the lessons
    before = len(proxy.requests)
    holders = [stem for stem in lesson_stems(book) if term in (book / "lessons" / f"{stem}.html").read_text().lower()]
    assert holders == ["09_batching_serving"], holders
    dom = chromium_dom((book / "search.html").as_uri() + f"?q={term}", tmp_path, proxy)
    results = re.search(r'<ul[^>]*class="search"[^>]*>(.*?)</ul>', dom, re.S)
    assert results, "the search page listed no results"
    assert re.findall(r'href="lessons/(\w+)\.html', results.group(1)) == ["09_batching_serving"]
    assert not proxy.external(since=before), "the search page asked other hosts for something"
