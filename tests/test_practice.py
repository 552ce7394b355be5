"""Interview practice: the scheduler behind our interface, the SQLite state (append-only
log, concurrent writers, corrupted and newer files, export and import), estimates with fresh
numbers and named mistakes, and the command driven as a learner would: scripted on stdin and
typed at a pseudo-terminal (pexpect), with Ctrl-C in the middle."""

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from datetime import timedelta

import pytest

from reference_engine.errors import DojoError
from reference_engine.practice import deck, scheduler
from reference_engine.practice.estimates import draw, instance, parse_number
from reference_engine.practice.render import math_to_text
from reference_engine.practice.store import SCHEMA_VERSION, Store

QUESTIONS = deck.all_questions()
BY_ID = {q["id"]: q for q in QUESTIONS}
KV_PER_TOKEN = BY_ID["01-14"]  # bytes of KV cache per token: the template with named mistakes


def in_process(*args, db, cwd, monkeypatch, capsys):
    """The command run in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from reference_engine.cli import main

    monkeypatch.setenv("DOJO_PRACTICE_DB", str(db))
    monkeypatch.chdir(cwd)
    code = main(["practice", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def cli(*args, db, stdin="", cwd=None, timeout=120):
    env = {**os.environ, "DOJO_PRACTICE_DB": str(db), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "reference_engine", "practice", *args], input=stdin,
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


# -- scheduler and state ---------------------------------------------------------------------

def test_fsrs_spaces_reviews_out_and_replay_rebuilds_the_state():
    t0 = scheduler.utcnow()
    state, due1 = scheduler.review(scheduler.new_state(), 3, t0)
    state, due2 = scheduler.review(state, 3, due1)
    state, due3 = scheduler.review(state, 3, due2)
    assert due1 - t0 < due2 - due1 < due3 - due2, "each good recall should push the next review further out"
    again, due_again = scheduler.review(state, 1, due3)
    assert due_again - due3 < due3 - due2, "a lapse brings the card back soon"
    assert scheduler.replay([(3, due1), (3, t0), (3, due2), (1, due3)]) == (again, due_again)
    with pytest.raises(ValueError, match="rating is 1"):
        scheduler.review(state, 5, t0)


def test_reviews_are_kept_in_an_append_only_log(tmp_path):
    store = Store(tmp_path / "p.db")
    q = BY_ID["01-01"]
    store.record_review(q, 3, 12.0, scheduler.utcnow(), "s")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        store.db.execute("UPDATE reviews SET rating = 4")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        store.db.execute("DELETE FROM reviews")
    assert [r["rating"] for r in store.reviews()] == [3]


def test_an_edited_question_keeps_its_history_and_is_marked_changed(tmp_path):
    store = Store(tmp_path / "p.db")
    q = dict(BY_ID["02-01"])
    store.record_review(q, 3, 5.0, scheduler.utcnow(), "s")
    store.sync([q])
    assert not store.card(q["id"])["changed"]
    store.sync([{**q, "answer": q["answer"] + " An added sentence."}])
    assert store.card(q["id"])["changed"] == 1
    assert len(store.reviews()) == 1


def test_a_corrupted_database_is_moved_aside_with_a_backup_never_overwritten(tmp_path):
    path = tmp_path / "p.db"
    path.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(DojoError, match="not a readable practice database") as err:
        Store(path)
    backups = list(tmp_path.glob("p.db.*.bak"))
    assert len(backups) == 1 and backups[0].read_bytes().startswith(b"this is not sqlite")
    assert "import" in str(err.value)
    Store(path).close()  # the next run starts afresh


def test_a_busy_database_is_left_alone(tmp_path, monkeypatch):
    path = tmp_path / "p.db"
    store = Store(path)
    store.record_review(BY_ID["01-01"], 3, 1.0, scheduler.utcnow(), "s")
    store.close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    real_connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: real_connect(*a, **{**k, "timeout": 0.2}))
    with pytest.raises(DojoError, match="it was not touched"):
        Store(path)
    holder.execute("ROLLBACK")
    holder.close()
    monkeypatch.undo()
    assert not list(tmp_path.glob("*.unreadable")) and len(Store(path).reviews()) == 1


def test_a_path_with_uri_characters_is_opened_as_itself(tmp_path):
    path = tmp_path / "a#b?c" / "p.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(DojoError, match="newer Inference Dojo"):
        Store(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a#b?c"], "no stray file beside it"


def test_another_sqlite_file_is_not_taken_over(tmp_path):
    path = tmp_path / "other.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE notes (text TEXT)")
    db.commit()
    db.close()
    with pytest.raises(DojoError, match="not a practice database"):
        Store(path)


def test_a_newer_schema_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "p.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(DojoError, match="newer Inference Dojo"):
        Store(path)
    assert path.read_bytes() == before and list(tmp_path.glob("p.db.*.bak"))


WRITER = """
import sys
from reference_engine.practice import deck, scheduler
from reference_engine.practice.store import Store
store = Store(sys.argv[1])
qs = [q for q in deck.all_questions() if q["kind"] == "concept"][:20]
for i in range(60):
    store.record_review(qs[i % 20], 1 + i % 4, 1.0, scheduler.utcnow(), sys.argv[2])
"""


def test_concurrent_sessions_do_not_corrupt_the_database(tmp_path):
    path = tmp_path / "p.db"
    Store(path).close()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), name]) for name in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    store = Store(path)
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert len(store.reviews()) == 120
    live = {k: (r["state"], r["due"]) for k, r in store.cards().items()}
    store.rebuild_cards()  # the interleaved log replays to the states the writers left
    assert {k: (r["state"], r["due"]) for k, r in store.cards().items()} == live


def test_export_and_import_move_the_history_between_machines(tmp_path):
    here = Store(tmp_path / "here.db")
    now = scheduler.utcnow()
    for i, q in enumerate(QUESTIONS[:5]):
        here.record_review(q, 2 + i % 3, 3.0, now - timedelta(days=3), "old")
        here.record_review(q, 3, 3.0, now, "new")
    here.export(tmp_path / "history.json")
    there = Store(tmp_path / "there.db")
    there.record_review(QUESTIONS[9], 1, 3.0, now, "there")
    assert there.import_(tmp_path / "history.json")["reviews"] == 10
    assert there.import_(tmp_path / "history.json")["reviews"] == 0, "importing twice adds nothing"
    mine = here.cards()
    assert {k: r["due"] for k, r in there.cards().items() if k in mine} == {k: r["due"] for k, r in mine.items()}
    assert len(there.reviews()) == 11
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DojoError, match="not a practice export"):
        there.import_(tmp_path / "bad.json")
    history = json.loads((tmp_path / "history.json").read_text())
    for field, value, message in (("rating", 7, "rating 7; ratings are 1 to 4"),
                                  ("reviewed_at", "2026-11-30T10:00:00", "without a time zone"),
                                  ("session; DROP TABLE reviews", "x", "unknown columns")):
        bad = json.loads(json.dumps(history))
        bad["reviews"][0]["review_id"] = "new"
        bad["reviews"][0][field] = value
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(DojoError, match=message):
            there.import_(tmp_path / "bad.json")
    assert len(there.reviews()) == 11, "a refused import writes nothing"
    assert there.import_(tmp_path / "history.json")["reviews"] == 0, "and the next import still works"


# -- estimates and rendering -----------------------------------------------------------------

def test_typed_numbers_are_parsed_with_units_or_refused_with_examples():
    assert parse_number("23,040") == 23040
    assert parse_number("22.5 KiB") == 23040
    assert parse_number("2.3e4 bytes") == 23000
    assert parse_number("1.2 GB") == 1.2e9
    assert parse_number("3 million tokens", "tokens") == 3e6
    for bad in ("abc", "", "1.2.3", "12 apples"):
        with pytest.raises(ValueError, match="is not a number; type digits"):
            parse_number(bad)


def test_an_estimate_names_the_common_mistake_it_matches():
    est = instance(KV_PER_TOKEN, {**{k: v[0] for k, v in KV_PER_TOKEN["template"]["inputs"].items()}})
    assert est.answer == KV_PER_TOKEN["value"]
    assert est.judge(est.answer * 1.01).correct
    wrong = dict(est.mistakes)
    for name, number in wrong.items():
        verdict = est.judge(number)
        assert not verdict.correct and verdict.mistake == name
    assert any("once" in name for name in wrong), "K and V counted once is the classic"
    assert est.judge(est.answer * 7).mistake is None


def test_fresh_numbers_change_the_answer():
    rng = random.Random(0)
    for q in (q for q in QUESTIONS if q["kind"] == "estimate"):
        drawn = [draw(q, rng) for _ in range(8)]
        assert len({round(d.answer, 9) for d in drawn} | {q["value"]}) >= 2, f"{q['id']}: the same number every time"
        assert all(d.prompt and d.steps and "{" not in d.prompt for d in drawn)


def test_the_catalogs_smollm2_is_the_engines():
    from reference_engine import ModelConfig
    from reference_engine.practice.catalog import MODELS

    engine, published = ModelConfig.from_name("smollm2-135m"), MODELS["smollm2-135m"]
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_seq_len",
                 "tie_embeddings"):
        assert getattr(published, name) == getattr(engine, name), name
    import torch

    from reference_engine.model import Transformer

    with torch.device("meta"):  # shapes only: nothing allocated
        model = Transformer(engine)
    assert published.params == sum(p.numel() for p in model.parameters())


def test_typed_forms_people_use():
    assert parse_number("8B", "parameters") == 8e9, "8B parameters is eight billion"
    assert parse_number("8 B", "bytes") == 8
    assert parse_number("25%", "percent") == 25
    with pytest.raises(ValueError, match="ambiguous"):
        parse_number("5m", "ms")


def test_the_closest_of_two_matching_mistakes_is_named_first():
    est = instance(KV_PER_TOKEN, {k: v[0] for k, v in KV_PER_TOKEN["template"]["inputs"].items()})
    est.mistakes = [("far", est.answer * 3.1), ("near", est.answer * 3.0)]
    assert est.judge(est.answer * 3.0).mistake == "near (or: far)"


def test_answers_render_without_raw_latex():
    assert math_to_text(r"divide by $\sqrt{d_k}$") == "divide by √(d_k)"
    assert math_to_text("`$HOME` and ```\n$x$\n```") == "`$HOME` and ```\n$x$\n```", "code is left alone"
    for q in QUESTIONS:
        text = math_to_text(q["answer"] + "\n\n" + q["question"])
        prose = "".join(part for i, part in enumerate(text.split("```")) if i % 2 == 0)
        for raw in ("\\times", "\\frac", "\\sqrt", "\\mathrm", "{,}"):
            assert raw not in prose, f"{q['id']}: {raw} left in the terminal text"


# -- the command, as a learner uses it -------------------------------------------------------

def expected(chapter, seed, count, kind="estimate"):
    picked = deck.select(QUESTIONS, [chapter], [kind], [])
    rng = random.Random(seed)
    return [draw(q, rng) for q in picked[:count]]


def test_scripted_review_checks_numbers_names_mistakes_and_saves(tmp_path):
    db = tmp_path / "p.db"
    first, second = expected("1", 7, 2)
    mistake_name, mistake_value = second.mistakes[0]
    run = cli("review", "--chapter", "1", "--kind", "estimate", "--limit", "2", "--seed", "7", db=db,
              stdin=f"twelve\n{first.answer:.6g}\n{mistake_value:.8g}\n")
    assert run.returncode == 0, run.stderr
    assert "'twelve' is not a number" in run.stdout
    assert "Correct:" in run.stdout and "Not quite" in run.stdout
    assert f"common mistake: {mistake_name}" in run.stdout
    assert run.stdout.count("Worked steps:") == 2
    stats = json.loads(cli("stats", "--json", db=db).stdout)  # a second process reads what the first saved
    assert stats["reviews"] == 2 and stats["cards"] == 2 and stats["recall_rate"] == 0.5


def test_input_ending_midway_keeps_what_was_answered(tmp_path):
    db = tmp_path / "p.db"
    first, _ = expected("2", 3, 2)
    run = cli("review", "--chapter", "2", "--kind", "estimate", "--limit", "2", "--seed", "3", db=db,
              stdin=f"{first.answer:.6g}\n")
    assert run.returncode == 130
    assert "Stopped (input ended): 1 answer saved." in run.stdout
    assert json.loads(cli("stats", "--json", db=db).stdout)["reviews"] == 1


@pytest.mark.parametrize("args, message", [
    (["review", "--chapter", "42"], "unknown chapter '42'; chapters are 01_attention"),
    (["review", "--tag", "kv-cach"], "unknown tag 'kv-cach' (did you mean"),
    (["mock", "gpus"], "unknown track 'gpus'"),
    (["drill", "start", "9.9"], "unknown drill '9.9'"),
    (["import", "missing.json"], "missing.json is not a practice export"),
    (["mock", "compression", "--drill", "9.9"], "unknown drill '9.9'"),
    (["mock", "compression", "--concepts", "-1"], "--concepts and --estimates are counts from 0"),
    (["mock", "compression", "--report", "nowhere/m.md"], "the folder nowhere does not exist"),
    (["stats", "--plot", "nowhere/s.png"], "the folder nowhere does not exist"),
    (["export", "nowhere/h.json"], "cannot write nowhere/h.json"),
])
def test_bad_input_gets_one_clear_line(tmp_path, args, message, monkeypatch, capsys):
    code, _, err = in_process(*args, db=tmp_path / "p.db", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_damaged_database_is_named_by_the_command_with_its_backup(tmp_path, monkeypatch, capsys):
    db = tmp_path / "p.db"
    db.write_bytes(b"\x00" * 4096)
    run = cli("stats", db=db)  # through the real entry point once: one line, no traceback
    assert run.returncode == 2 and "is not a readable practice database" in run.stderr
    assert "Traceback" not in run.stderr and list(tmp_path.glob("p.db.*.bak"))
    code, _, err = in_process("stats", db=tmp_path, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and "is a folder" in err


def spawn(args, db, cwd):
    pexpect = pytest.importorskip("pexpect")  # a test dependency: installed by `make setup`
    env = {**os.environ, "DOJO_PRACTICE_DB": str(db), "COLUMNS": "100"}
    # subtle: pytest-xdist's workers ignore SIGINT, and an ignored signal stays ignored in a
    # child; restore the default so that Ctrl-C reaches the session as it does at a terminal
    return pexpect.spawn(sys.executable, ["-m", "reference_engine", "practice", *args], env=env, cwd=str(cwd),
                         encoding="utf-8", timeout=60,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_typed_at_a_terminal_concept_review_then_ctrl_c(tmp_path):
    db = tmp_path / "p.db"
    child = spawn(["review", "--chapter", "1", "--kind", "concept", "--limit", "3"], db, tmp_path)
    child.expect(r"\[1/3\] 01-01 · concept")
    child.expect("Your answer")
    child.sendline("the dot product has variance d_k")
    child.sendline("")
    child.expect("Key points:")
    child.expect("Which key points did you cover")
    child.sendline("7")
    child.expect("there are \\d key points")
    child.sendline("1")
    child.expect(r"How well did you recall it\? .*\[Enter: \d")
    child.sendline("")
    child.expect("Saved: ")
    child.expect(r"\[2/3\]")
    child.expect("Your answer")
    child.sendintr()  # Ctrl-C in the middle of the second question
    child.expect("Stopped \\(interrupted\\): 1 answer saved.")
    child.expect(pexpect_eof())
    child.close()
    assert child.exitstatus == 130
    store = Store(db)
    [review] = store.reviews()
    assert review["question_id"] == "01-01" and "variance d_k" in json.loads(review["detail"])["typed"]


def pexpect_eof():
    import pexpect

    return pexpect.EOF


SOLUTION_1_1 = '''
import torch

def stable_softmax(x, dim=-1):
    shifted = x - x.amax(dim=dim, keepdim=True)
    e = shifted.exp()
    return e / e.sum(dim=dim, keepdim=True)
'''


def test_drill_stub_fails_hints_count_and_a_syntax_error_is_named(tmp_path, monkeypatch, capsys):
    db = tmp_path / "p.db"

    def run(*args):
        return in_process(*args, db=db, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)

    assert run("drill", "start", "1.1", "--minutes", "5")[0] == 0
    path = tmp_path / "dojo-drills" / "drill_1_1.py"
    assert "def stable_softmax" in path.read_text() and "Task 1.1" in path.read_text()
    assert run("drill", "start", "1.1")[0] == 2, "an existing drill file is not overwritten"
    assert run("drill", "hint")[1].startswith("Hint 1 of")
    stub = cli("drill", "submit", db=db, cwd=tmp_path)  # the real command, grading in its sandbox
    assert stub.returncode == 1 and "Drill 1.1: 0/" in stub.stdout and "1 hint" in stub.stdout
    path.write_text(SOLUTION_1_1.replace("e.sum(", "e.sum((") + "\n")
    code, _, err = run("drill", "submit", str(path))
    assert code == 2 and "drill_1_1.py line 7" in err and err.count("\n") == 1


def test_mock_interview_typed_at_a_terminal_writes_a_report(tmp_path):
    db = tmp_path / "p.db"
    report = tmp_path / "mock.md"
    child = spawn(["mock", "attention-decoding", "--concepts", "1", "--estimates", "1", "--drill", "1.1",
                   "--seed", "5", "--report", str(report)], db, tmp_path)
    (tmp_path / "dojo-drills").mkdir()
    (tmp_path / "dojo-drills" / "drill_1_1.py").write_text("# an earlier drill, kept\n")
    child.expect("3 items")
    child.expect("Your answer")
    child.sendline("")
    child.expect("Which key points")
    child.sendline("all")
    child.expect("How well")
    child.sendline("")
    child.expect(r"Your estimate \(")
    child.sendline("1")  # a wrong number
    child.expect("Not quite")
    child.expect(r"Edit (\S+drill_1_1_2.py) in your editor")
    (tmp_path / child.match.group(1)).write_text(SOLUTION_1_1)
    child.sendline("")
    child.expect("Drill 1.1: (\\d+)/(\\d+) points", timeout=180)
    assert child.match.group(1) == child.match.group(2)
    child.expect("Report written")
    child.expect(pexpect_eof())
    text = report.read_text()
    assert (tmp_path / "dojo-drills" / "drill_1_1.py").read_text() == "# an earlier drill, kept\n"
    assert "| concept | 100% |" in text and "| estimate | 0% |" in text and "| drill 1.1 | coding | 100% |" in text
    assert "## What to review" in text and "## Score by topic" in text
    stats = json.loads(cli("stats", "--json", "--plot", str(tmp_path / "s.png"), db=db).stdout)
    assert stats["reviews"] == 2 and stats["drills"][0]["score"] == stats["drills"][0]["max_score"]
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
