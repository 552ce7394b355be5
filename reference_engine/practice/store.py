"""The learner's practice state: one SQLite database.

Where: `platformdirs.user_data_dir("inference-dojo")/practice.sqlite3`, or the path in
$DOJO_PRACTICE_DB. Tables:
  cards(question_id, content_hash, changed, state, due)   derived, rebuilt from the log
  reviews(...)       append-only log of every answer (triggers refuse UPDATE and DELETE)
  drills(...)        started coding drills; submissions(...) append-only grading results
Each write is its own short transaction (BEGIN IMMEDIATE, WAL, a busy timeout), so two
sessions at once wait for each other instead of corrupting the file, and what was
answered before a Ctrl-C is already on disk.

A file that is not a readable database, or was written by a newer schema, is never
overwritten: a copy is kept next to it and the command stops with a message.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import uuid
from datetime import datetime, timezone
from pathlib import Path

from ..errors import DojoError
from . import scheduler

SCHEMA_VERSION = 1
ENV = "DOJO_PRACTICE_DB"
EXPORT_FORMAT = "inference-dojo-practice"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cards (
    question_id TEXT PRIMARY KEY, content_hash TEXT NOT NULL, changed INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL, due TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reviews (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, review_id TEXT NOT NULL UNIQUE, question_id TEXT NOT NULL,
    content_hash TEXT NOT NULL, kind TEXT NOT NULL, rating INTEGER NOT NULL, correct INTEGER,
    seconds REAL NOT NULL, reviewed_at TEXT NOT NULL, session TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '{}');
CREATE TRIGGER IF NOT EXISTS reviews_append_only_u BEFORE UPDATE ON reviews
    BEGIN SELECT RAISE(ABORT, 'the review log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS reviews_append_only_d BEFORE DELETE ON reviews
    BEGIN SELECT RAISE(ABORT, 'the review log is append-only'); END;
CREATE TABLE IF NOT EXISTS drills (
    drill_id TEXT PRIMARY KEY, task TEXT NOT NULL, path TEXT NOT NULL, started_at TEXT NOT NULL,
    limit_s REAL NOT NULL, hints INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS submissions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, submission_id TEXT NOT NULL UNIQUE, drill_id TEXT NOT NULL,
    task TEXT NOT NULL, submitted_at TEXT NOT NULL, seconds REAL NOT NULL, limit_s REAL NOT NULL,
    score INTEGER NOT NULL, max_score INTEGER NOT NULL, hints INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS submissions_append_only BEFORE UPDATE ON submissions
    BEGIN SELECT RAISE(ABORT, 'the submission log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS submissions_append_only_d BEFORE DELETE ON submissions
    BEGIN SELECT RAISE(ABORT, 'the submission log is append-only'); END;
"""


def default_path() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("inference-dojo", appauthor=False)) / "practice.sqlite3"


def content_hash(question: dict) -> str:
    """What a card's history is tied to: the question, its answer and its template."""
    text = json.dumps({k: question.get(k) for k in ("question", "answer", "template", "key_points")},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Store:
    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else default_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DojoError(f"cannot create the folder of the practice database {self.path} ({err.strerror}); "
                            f"point ${ENV} (or --db) at a writable file") from None
        if self.path.is_dir():
            raise DojoError(f"{self.path} is a folder; the practice database is a file (set ${ENV} or --db to "
                            "a file path such as ~/practice.sqlite3)")
        self._check_existing()
        self.db = None
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA busy_timeout=30000")
            self.db.executescript(SCHEMA)  # every statement is IF NOT EXISTS
            with self.transaction():
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                version = int(self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
        except sqlite3.DatabaseError as err:
            if self.db is not None:
                self.db.close()
            self._unusable(err)
        if version > SCHEMA_VERSION:  # written between the check and now: refuse, touching nothing
            self.db.close()
            raise DojoError(f"{self.path} was written by a newer Inference Dojo (schema {version}); upgrade first")

    # -- opening ---------------------------------------------------------------------------
    def _check_existing(self) -> None:
        """Refuse a file that is not a practice database, is damaged, or is newer than this code."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        try:
            probe = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True, timeout=30)
            try:
                ok = probe.execute("PRAGMA quick_check").fetchone()[0]
                tables = {r[0] for r in probe.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                row = probe.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() \
                    if "meta" in tables else None
            finally:
                probe.close()
        except sqlite3.DatabaseError as err:
            self._unusable(err)
        if ok != "ok":
            self._move_aside(f"is damaged (SQLite's check says: {ok})")
        if tables and row is None:
            raise DojoError(f"{self.path} is an SQLite database, but not a practice database (it has tables "
                            f"{', '.join(sorted(tables)[:5])}); it was not touched. Pass another file with --db.")
        version = int(row[0]) if row is not None and str(row[0]).isdigit() else None
        if row is not None and version is None:
            self._move_aside(f"has an unreadable schema version ({row[0]!r})")
        if version is not None and version > SCHEMA_VERSION:
            backup = self.path.with_name(f"{self.path.name}.schema{version}.bak")
            if not backup.exists():  # one copy, not one per attempt
                self._copy(backup)
            raise DojoError(f"{self.path} was written by a newer Inference Dojo (schema {version}; this version "
                            f"reads up to {SCHEMA_VERSION}). Upgrade the package (pip install -U inference-dojo). "
                            f"It was left as it is; a copy is at {backup}.")

    def _unusable(self, err: sqlite3.DatabaseError) -> None:
        """A file SQLite cannot read as a database is moved aside; a busy, read-only or full one is
        left alone (nothing is wrong with it)."""
        code = getattr(err, "sqlite_errorcode", None)
        if code in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT) or "not a database" in str(err):
            self._move_aside(f"is not a readable practice database ({err})")
        raise DojoError(f"cannot use the practice database {self.path} ({err}); it was not touched. If another "
                        "practice session holds it, finish that one first.") from None

    def _copy(self, backup: Path) -> None:
        shutil.copy2(self.path, backup)
        for suffix in ("-wal", "-shm"):
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                shutil.copy2(side, backup.with_name(backup.name + suffix))

    def _move_aside(self, problem: str) -> None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        backup = self.path.with_name(f"{self.path.name}.{stamp}.bak")
        aside = self.path.with_name(f"{self.path.name}.{stamp}.unreadable")
        self._copy(backup)
        for suffix in ("", "-wal", "-shm"):  # the write-ahead log belongs to the file it was written for
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                side.rename(aside.with_name(aside.name + suffix))
        raise DojoError(f"{self.path} {problem}. Nothing was overwritten: the file was moved to {aside.name} and "
                        f"copied to {backup.name}. The next run starts a new database; `practice import FILE` "
                        "restores an export.")

    def transaction(self):
        return _Transaction(self.db)

    def close(self) -> None:
        self.db.close()

    # -- cards -----------------------------------------------------------------------------
    def sync(self, questions: list[dict]) -> None:
        """Mark cards whose question changed since they were last reviewed (history kept)."""
        with self.transaction():
            for q in questions:
                row = self.db.execute("SELECT content_hash FROM cards WHERE question_id=?", (q["id"],)).fetchone()
                if row is not None and row["content_hash"] != content_hash(q):
                    self.db.execute("UPDATE cards SET content_hash=?, changed=1 WHERE question_id=?",
                                    (content_hash(q), q["id"]))

    def card(self, question_id: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM cards WHERE question_id=?", (question_id,)).fetchone()

    def cards(self) -> dict[str, sqlite3.Row]:
        return {r["question_id"]: r for r in self.db.execute("SELECT * FROM cards")}

    def record_review(self, question: dict, rating: int, seconds: float, when: datetime, session: str,
                      correct: bool | None = None, detail: dict | None = None) -> datetime:
        """Append the review to the log and move the card on; returns when it is due next.
        The card's state is replayed from its log inside the write transaction, so two sessions
        reviewing the same card leave the state the log's time order gives."""
        if rating not in scheduler.RATINGS:
            raise ValueError(f"a rating is 1 to 4, not {rating!r}")
        hash_ = content_hash(question)
        with self.transaction():
            self.db.execute(
                "INSERT INTO reviews (review_id, question_id, content_hash, kind, rating, correct, seconds, "
                "reviewed_at, session, detail) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (uuid.uuid4().hex, question["id"], hash_, question["kind"], rating,
                 None if correct is None else int(correct), seconds, when.isoformat(), session,
                 json.dumps(detail or {}, default=str)))
            return self._replay_card(question["id"], hash_, changed=0)

    def _replay_card(self, question_id: str, hash_: str, changed: int) -> datetime:
        log = [(r["rating"], datetime.fromisoformat(r["reviewed_at"])) for r in self.db.execute(
            "SELECT rating, reviewed_at FROM reviews WHERE question_id=? ORDER BY reviewed_at, seq", (question_id,))]
        state, due = scheduler.replay(log)
        self.db.execute("INSERT OR REPLACE INTO cards VALUES (?,?,?,?,?)",
                        (question_id, hash_, changed, state, due.isoformat()))
        return due

    def reviews(self) -> list[sqlite3.Row]:
        return list(self.db.execute("SELECT * FROM reviews ORDER BY reviewed_at, seq"))

    def rebuild_cards(self) -> None:
        """Every card's state replayed from the review log (after an import, or a scheduler change)."""
        with self.transaction():
            self._rebuild()

    def _rebuild(self) -> None:
        latest = {r["question_id"]: r["content_hash"] for r in self.db.execute(
            "SELECT question_id, content_hash FROM reviews ORDER BY reviewed_at, seq")}
        for question_id, hash_ in latest.items():
            old = self.card(question_id)
            changed = int(old["changed"]) if old is not None and old["content_hash"] == hash_ else 0
            self._replay_card(question_id, hash_, changed)

    # -- drills ----------------------------------------------------------------------------
    def start_drill(self, task: str, path: Path, limit_s: float, when: datetime) -> str:
        drill_id = uuid.uuid4().hex[:12]
        with self.transaction():
            self.db.execute("INSERT INTO drills VALUES (?,?,?,?,?,0)",
                            (drill_id, task, str(Path(path).resolve()), when.isoformat(), limit_s))
        return drill_id

    def drill_for(self, path: Path) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM drills WHERE path=? ORDER BY started_at DESC LIMIT 1",
                               (str(Path(path).resolve()),)).fetchone()

    def latest_drill(self) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM drills ORDER BY started_at DESC LIMIT 1").fetchone()

    def use_hint(self, drill_id: str) -> int:
        with self.transaction():
            self.db.execute("UPDATE drills SET hints = hints + 1 WHERE drill_id=?", (drill_id,))
        return self.db.execute("SELECT hints FROM drills WHERE drill_id=?", (drill_id,)).fetchone()[0]

    def record_submission(self, drill: sqlite3.Row, when: datetime, score: int, max_score: int) -> float:
        seconds = (when - datetime.fromisoformat(drill["started_at"])).total_seconds()
        with self.transaction():
            self.db.execute(
                "INSERT INTO submissions (submission_id, drill_id, task, submitted_at, seconds, limit_s, score, "
                "max_score, hints) VALUES (?,?,?,?,?,?,?,?,?)",
                (uuid.uuid4().hex, drill["drill_id"], drill["task"], when.isoformat(), seconds, drill["limit_s"],
                 score, max_score, drill["hints"]))
        return seconds

    def submissions(self) -> list[sqlite3.Row]:
        return list(self.db.execute("SELECT * FROM submissions ORDER BY submitted_at, seq"))

    # -- moving between machines -------------------------------------------------------------
    def export(self, path: Path) -> dict:
        """Every log row as JSON, written atomically (a temporary file, then a rename)."""
        data = {"format": EXPORT_FORMAT, "schema": SCHEMA_VERSION,
                "reviews": [dict(r) for r in self.reviews()],
                "drills": [dict(r) for r in self.db.execute("SELECT * FROM drills")],
                "submissions": [dict(r) for r in self.submissions()]}
        for table in ("reviews", "submissions"):
            for row in data[table]:
                row.pop("seq")
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        try:
            tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
            tmp.replace(path)
        except OSError as err:
            raise DojoError(f"cannot write {path} ({err.strerror}); choose a writable path") from None
        return {k: len(v) for k, v in data.items() if isinstance(v, list)}

    def import_(self, path: Path) -> dict:
        """Merge an export into this database: every row is checked first (nothing is written if
        one is wrong), rows already here (same ids) are skipped, and the cards are replayed from
        the merged log in the same transaction."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DojoError(f"{path} is not a practice export ({type(err).__name__}: {err})") from None
        if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
            raise DojoError(f"{path} is not a practice export (made by `practice export FILE`)")
        if not isinstance(data.get("schema"), int) or isinstance(data.get("schema"), bool):
            raise DojoError(f"{path}: the export's schema must be a whole number, not {data.get('schema')!r}")
        if data["schema"] > SCHEMA_VERSION:
            raise DojoError(f"{path} was exported by a newer Inference Dojo (schema {data['schema']}); upgrade first")
        tables = {"reviews": "review_id", "drills": "drill_id", "submissions": "submission_id"}
        for table in tables:
            rows = data.get(table, [])
            if not isinstance(rows, list):
                raise DojoError(f"{path}: {table} must be a list of rows")
            columns = {r["name"] for r in self.db.execute(f"PRAGMA table_info({table})")} - {"seq"}
            for i, row in enumerate(rows):
                problem = _row_problem(table, row, columns)
                if problem:
                    raise DojoError(f"{path}: {table} row {i + 1} {problem}; nothing was imported")
        added = {}
        try:
            with self.transaction():
                for table in tables:
                    before = self.db.total_changes
                    for row in data.get(table, []):
                        row = {k: _utc(v) if k.endswith("_at") else v for k, v in row.items()}
                        names = sorted(row)  # checked against the table's columns above
                        self.db.execute(f"INSERT OR IGNORE INTO {table} ({', '.join(names)}) VALUES "
                                        f"({', '.join('?' * len(names))})", [row[n] for n in names])
                    added[table] = self.db.total_changes - before
                self._rebuild()
        except (sqlite3.DatabaseError, ValueError) as err:
            raise DojoError(f"{path}: an entry does not fit this database ({err}); nothing was imported") from None
        return added


def _utc(text: str) -> str:
    """A checked timestamp in the form the log sorts by: ISO 8601 in UTC."""
    return datetime.fromisoformat(str(text)).astimezone(timezone.utc).isoformat()


def _row_problem(table: str, row, columns: set[str]) -> str | None:
    """What is wrong with one row of an export, or None."""
    if not isinstance(row, dict):
        return "is not a mapping of columns"
    unknown = set(row) - columns
    if unknown:
        return f"has unknown columns {', '.join(sorted(unknown))}"
    if table == "reviews":
        if row.get("rating") not in scheduler.RATINGS or isinstance(row.get("rating"), bool):
            return f"has rating {row.get('rating')!r}; ratings are 1 to 4"
        if row.get("kind") not in ("concept", "estimate", "coding"):
            return f"has kind {row.get('kind')!r}"
    for key in ("reviewed_at", "started_at", "submitted_at"):
        if key in row:
            try:
                when = datetime.fromisoformat(str(row[key]))
            except ValueError:
                return f"has {key} {row[key]!r}, not a date and time"
            if when.tzinfo is None:
                return f"has {key} {row[key]!r} without a time zone"
    return None


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (or ROLLBACK on an exception): takes the write lock up front."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, value, traceback):
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        return False
