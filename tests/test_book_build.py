"""`make book`'s behaviour on small books: execution cached (a second build executes
nothing, an edited code cell executes its lesson again, an edited question bank does not),
a failing lesson stops the build naming the notebook and the cell, a malformed or orphaned
question bank stops it naming the file and the entry."""

import nbformat
import pytest
import yaml

from booktools import book_command, new_source
from reference_engine.questions import BankError, load_bank


def tiny_lesson(*code: str):
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_markdown_cell("# Chapter 1 — Tiny\n\nThe cost is $\\frac{a}{b}$.")]
    nb.cells += [nbformat.v4.new_code_cell(c) for c in code]
    return nb


COUNT_RUN = "import os\nopen(os.environ['DOJO_BOOK_RUNS'], 'a').write('run\\n')"


def bank(n=15, **changes):
    questions = [{"id": f"01-{i:02d}", "kind": "concept", "tags": ["tiny"], "question": f"Question number {i}?",
                  "answer": f"Answer number {i}, " + "long enough to be a written explanation of the point. " * 2,
                  "difficulty": "easy", "minutes": 2, "key_points": ["The first point.", "The second point."]}
                 for i in range(1, n + 1)]
    for i, fields in changes.items():
        questions[int(i[1:]) - 1].update(fields)
    return {"chapter": "01_tiny", "title": "Tiny", "questions": questions}


@pytest.fixture
def tiny_book(tmp_path):
    """(build(*settings), runs file, source dir, questions dir): a one-lesson book with its
    own bank, exercise and cache."""
    questions, exercises = tmp_path / "questions", tmp_path / "exercises"
    questions.mkdir()
    exercises.mkdir()
    (questions / "01_tiny.yaml").write_text(yaml.safe_dump(bank()))
    nbformat.write(tiny_lesson("pass"), exercises / "01_tiny.ipynb")
    src = new_source(tmp_path, {"01_tiny": tiny_lesson(COUNT_RUN, "print(6 * 7)")})
    runs = tmp_path / "runs.txt"
    runs.touch()

    def build(*settings):
        return book_command(src, tmp_path / "html", f"dojo_questions_dir={questions}",
                            f"dojo_exercises_dir={exercises}", f"nb_execution_cache_path={tmp_path / 'cache'}",
                            *settings, env={"DOJO_BOOK_RUNS": str(runs)})
    return build, runs, src, questions


def test_execution_is_cached_until_a_code_cell_changes(tiny_book):
    build, runs, src, questions = tiny_book
    done = build()
    assert done.returncode == 0, done.stderr
    page = (src.parent / "html" / "lessons" / "01_tiny.html").read_text()
    assert "42" in page and "<mfrac>" in page and "Question number 15?" in page and "_downloads/" in page
    assert build().returncode == 0 and runs.read_text().count("run") == 1, "nothing changed: nothing executes"

    (questions / "01_tiny.yaml").write_text(yaml.safe_dump(bank(q15={"question": "An edited question?"})))
    assert build().returncode == 0 and runs.read_text().count("run") == 1, "questions are not code"
    assert "An edited question?" in (src.parent / "html" / "lessons" / "01_tiny.html").read_text()

    nbformat.write(tiny_lesson(COUNT_RUN, "print(6 * 8)"), src / "lessons" / "01_tiny.ipynb")
    assert build().returncode == 0 and runs.read_text().count("run") == 2, "a changed code cell executes again"
    assert "48" in (src.parent / "html" / "lessons" / "01_tiny.html").read_text()


def test_a_failing_lesson_stops_the_build_naming_the_cell(tiny_book):
    build, _, src, _ = tiny_book
    nbformat.write(tiny_lesson("x = 1", "ratio = 1 / 0", "print(x)"), src / "lessons" / "01_tiny.ipynb")
    done = build()
    assert done.returncode != 0
    assert "lessons/01_tiny.ipynb failed to execute, code cell 2 of 3" in done.stderr, done.stderr
    assert "ZeroDivisionError" in done.stderr
    assert not (src.parent / "html" / "lessons" / "01_tiny.html").exists(), "no page without its outputs"


def test_a_lesson_that_times_out_is_named_too(tiny_book):
    build, _, src, _ = tiny_book
    nbformat.write(tiny_lesson("x = 1", "import time\ntime.sleep(60)"), src / "lessons" / "01_tiny.ipynb")
    done = build("nb_execution_timeout=3")
    assert done.returncode != 0
    assert "lessons/01_tiny.ipynb failed to execute, code cell 2 of 2 (it timed out)" in done.stderr, done.stderr


def test_a_bank_written_after_its_lesson_appears_on_the_next_build(tiny_book):
    build, runs, src, questions = tiny_book
    (questions / "01_tiny.yaml").unlink()
    assert build().returncode == 0
    page = src.parent / "html" / "lessons" / "01_tiny.html"
    assert "Question number 1?" not in page.read_text()
    (questions / "01_tiny.yaml").write_text(yaml.safe_dump(bank()))
    assert build().returncode == 0 and "Question number 1?" in page.read_text()
    assert runs.read_text().count("run") == 1


def test_a_malformed_bank_stops_the_build_naming_file_and_entry(tiny_book):
    build, _, _, questions = tiny_book
    broken = bank(q3={"kind": "trivia"})
    (questions / "01_tiny.yaml").write_text(yaml.safe_dump(broken))
    done = build()
    assert done.returncode != 0
    assert "01_tiny.yaml: entry 3 (id 01-03): kind 'trivia' is not one of concept, estimate, coding" in done.stderr

    (questions / "01_tiny.yaml").write_text("chapter: 01_tiny\ntitle: [unclosed\n")
    done = build()
    assert done.returncode != 0 and "01_tiny.yaml: line" in done.stderr and "not valid YAML" in done.stderr


def test_a_bank_without_its_lesson_is_refused(tiny_book):
    build, _, _, questions = tiny_book
    orphan = {**bank(), "chapter": "02_orphan"}
    orphan["questions"] = [{**q, "id": q["id"].replace("01-", "02-")} for q in orphan["questions"]]
    (questions / "02_orphan.yaml").write_text(yaml.safe_dump(orphan))
    done = build()
    assert done.returncode != 0 and "02_orphan.yaml has no lesson: write lessons/02_orphan.ipynb" in done.stderr


@pytest.mark.parametrize("change, message", [
    ({"q2": {"answer": "Too short."}}, "entry 2 (id 01-02): the answer must be a written explanation"),
    ({"q4": {"id": "01-03"}}, "entry 4 (id 01-03): the id is used twice"),
    ({"q5": {"level": 3}}, "entry 5 (id 01-05) has unknown fields level"),
    ({"q5": {"difficulty": 3}}, "entry 5 (id 01-05): difficulty 3 is not one of easy, medium, hard"),
    ({"q3": {"key_points": ["only one"]}}, "entry 3 (id 01-03): key_points is a list of 2 to 6 short sentences"),
    ({"q3": {"minutes": 0}}, "entry 3 (id 01-03): minutes is the time budget"),
    ({"q6": {"kind": "estimate"}}, "entry 6 (id 01-06): estimate questions carry a template"),
    ({"q6": {"kind": "estimate", "value": 8, "template": {
        "prompt": "{nbytes} bytes per number?", "inputs": {"nbytes": [2, 4]}, "formula": "nbytes * 2",
        "unit": "bytes", "tolerance": 0.05, "steps": "{answer}"}}},
     "entry 6 (id 01-06): the formula gives 4 for the first choice of every input; value says 8"),
    ({"q6": {"kind": "estimate", "value": 4, "template": {
        "prompt": "{nbytes} bytes per number?", "inputs": {"nbytes": [2, 4]}, "formula": "nbytes * 2",
        "unit": "bytes", "tolerance": 0.05, "steps": "{answer}",
        "mistakes": [{"name": "doubled twice", "formula": "nbytes + 2"}]}}},
     "entry 6 (id 01-06): mistake 'doubled twice' gives the right answer for inputs {'nbytes': 2}"),
    ({"q6": {"kind": "estimate", "value": 4, "template": {
        "prompt": "{gpu} bandwidth?", "inputs": {"gpu": ["h100", "a100"]}, "formula": "g.bandwidth_gbs",
        "unit": "GB/s", "tolerance": 0.05, "steps": "{answer}"}}},
     "entry 6 (id 01-06): template input gpu: 'h100' is not one of h100-sxm"),
    ({"q7": {"task": "1.2"}}, "entry 7 (id 01-07): task (a graded task id such as \"1.2\") belongs to coding"),
    ({"q8": {"tags": ["2:4", 124]}}, "entry 8 (id 01-08): tags must be a non-empty list of words"),
])
def test_bank_errors_name_the_entry(tmp_path, change, message):
    path = tmp_path / "01_tiny.yaml"
    path.write_text(yaml.safe_dump(bank(**change)))
    with pytest.raises(BankError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_bank(path)


@pytest.mark.parametrize("args, message", [
    (["--set", "nb_execution_mode"], "--set takes NAME=VALUE (a Sphinx setting), got 'nb_execution_mode'"),
    (["--source", "/nonexistent/book"], "the book was not built: "),
])
def test_bad_book_arguments_are_one_clear_line(args, message, tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "reference_engine", "book", "--quiet", "--out", str(tmp_path / "html"),
                           *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
