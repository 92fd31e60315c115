"""SQLite storage for the feedback app: prepared pairs, pairs issued to raters, judgements.

Three tables hold the data, one idea each (a fourth, ``sessions``, holds sign-ins):

- ``items``: a prompt with two completions (and which checkpoint wrote each side, and the
  sampling settings). Written by the background generator *before* anyone asks for it, so a
  rater never waits on the model and a restart keeps the prepared queue.
- ``issues``: an item shown to one rater, under an unguessable id. A judgement must name an
  issue id that belongs to the rater who sends it, and each issue is judged at most once.
- ``judgements``: one row per accepted judgement. It copies the pair text, checkpoints and
  sampling settings from the item, so the row is self-contained for export and audits.
- ``sessions``: a browser sign-in: the sha256 of a random session id (the cookie holds the id),
  the rater and when it expires. Signing out deletes the row, so a copied cookie stops working.

The database runs in WAL mode with ``synchronous=FULL``: a judgement the server has answered
"ok" for is on disk, so killing the server (even with SIGKILL) loses nothing acknowledged.
One connection is shared by all threads behind a lock; SQLite serialises writers anyway and
each request holds the lock for well under a millisecond.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, InputError

CHOICES = ("a", "b", "tie", "both_bad")
MAX_COMMENT_CHARS = 2000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt TEXT NOT NULL,
    completion_a TEXT NOT NULL,
    completion_b TEXT NOT NULL,
    checkpoint_a TEXT NOT NULL,
    checkpoint_b TEXT NOT NULL,
    sampling TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS issues (
    id TEXT PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items(id),
    rater TEXT NOT NULL,
    issued_at REAL NOT NULL,
    judged_at REAL,
    UNIQUE (item_id, rater)
);
CREATE INDEX IF NOT EXISTS issues_by_item ON issues(item_id);
CREATE INDEX IF NOT EXISTS issues_pending ON issues(rater, judged_at);
CREATE TABLE IF NOT EXISTS judgements (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    issue_id TEXT NOT NULL UNIQUE REFERENCES issues(id),
    item_id INTEGER NOT NULL REFERENCES items(id),
    rater TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
    rating INTEGER CHECK (rating IS NULL OR rating BETWEEN 1 AND 5),
    comment TEXT NOT NULL DEFAULT '',
    prompt TEXT NOT NULL,
    completion_a TEXT NOT NULL,
    completion_b TEXT NOT NULL,
    checkpoint_a TEXT NOT NULL,
    checkpoint_b TEXT NOT NULL,
    sampling TEXT NOT NULL,
    issued_at REAL NOT NULL,
    judged_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id_hash TEXT PRIMARY KEY,
    rater TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
"""


class JudgementRejected(InputError):
    """A judgement the server refuses; `status` is the HTTP status the app answers with."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class IssuedPair:
    """What a rater is shown: `pair_id` is the issue id they must send back."""

    pair_id: str
    prompt: str
    completion_a: str
    completion_b: str
    issued_at: float

    def to_json(self) -> dict:
        return {"pair_id": self.pair_id, "prompt": self.prompt,
                "completion_a": self.completion_a, "completion_b": self.completion_b}


@dataclass(frozen=True)
class Judgement:
    id: int
    pair_id: str
    item_id: int
    rater: str
    choice: str
    rating: int | None
    comment: str
    prompt: str
    completion_a: str
    completion_b: str
    checkpoint_a: str
    checkpoint_b: str
    sampling: dict
    issued_at: float
    judged_at: float


def _rating(rating) -> int | None:
    """An integer 1-5 (a JSON integer, or a form's digit), or None for no rating.

    2.5, 4.0, 1e999 and true are refused: a float is not a rating, and JSON's booleans are
    not integers even though Python's are."""
    if rating is None or (isinstance(rating, str) and not rating.strip()):
        return None
    if isinstance(rating, str) and rating.strip() in ("1", "2", "3", "4", "5"):
        return int(rating)
    if isinstance(rating, int) and not isinstance(rating, bool) and 1 <= rating <= 5:
        return rating
    shown = repr(rating) if not isinstance(rating, str) else repr(rating[:20])
    raise JudgementRejected(f"rating must be an integer from 1 to 5, or empty; got {shown}", 422)


def validate_judgement(choice, rating, comment) -> tuple[str, int | None, str]:
    """Normalise the rater's input; raise JudgementRejected (422) naming the bad field."""
    if not isinstance(choice, str) or choice not in CHOICES:
        shown = repr(choice[:20]) if isinstance(choice, str) else type(choice).__name__
        raise JudgementRejected(f"choice must be one of {', '.join(CHOICES)}, got {shown}", 422)
    rating = _rating(rating)
    comment = "" if comment is None else comment
    if not isinstance(comment, str):
        raise JudgementRejected("comment must be a string", 422)
    if len(comment) > MAX_COMMENT_CHARS:
        raise JudgementRejected(f"comment is longer than {MAX_COMMENT_CHARS} characters", 422)
    return choice, rating, comment.strip()


class FeedbackStore:
    """Thread-safe access to one feedback database file (created if missing)."""

    def __init__(self, path, *, seed: int | None = None):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                       timeout=30.0)
            self._db.row_factory = sqlite3.Row
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise DataError(f"{self.path}: cannot open as a feedback database ({e}); "
                            "pass a new --db path or the file the server wrote") from e
        if str(mode).lower() != "wal":
            raise DataError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); put --db on a local disk")
        self._lock = threading.Lock()
        self._rng = random.Random(seed)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ helpers

    def _write(self, fn):
        """Run `fn(db)` inside one immediate transaction, under the lock."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return out

    def _read(self, sql: str, params=()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def journal_mode(self) -> str:
        return self._read("PRAGMA journal_mode")[0][0]

    def secret(self, key: str = "csrf_secret") -> bytes:
        """A random secret kept in the database, so signed values survive restarts."""
        def get_or_create(db):
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if row:
                return row[0]
            value = secrets.token_hex(32)
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
            return value
        return bytes.fromhex(self._write(get_or_create))

    # ------------------------------------------------------------------ the prepared queue

    def add_item(self, prompt: str, completion_a: str, completion_b: str, checkpoint_a: str,
                 checkpoint_b: str, sampling: dict) -> int:
        def insert(db):
            cur = db.execute(
                "INSERT INTO items (prompt, completion_a, completion_b, checkpoint_a, checkpoint_b, "
                "sampling, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (prompt, completion_a, completion_b, checkpoint_a, checkpoint_b,
                 json.dumps(sampling, sort_keys=True), time.time()))
            return cur.lastrowid
        return self._write(insert)

    def item_count(self) -> int:
        return self._read("SELECT COUNT(*) FROM items")[0][0]

    def ready_count(self) -> int:
        """Prepared items that no rater has been shown yet."""
        return self._read("SELECT COUNT(*) FROM items WHERE NOT EXISTS "
                          "(SELECT 1 FROM issues WHERE issues.item_id = items.id)")[0][0]

    # ------------------------------------------------------------------ issuing and judging

    def draw_shared(self, shared_fraction: float) -> bool:
        """One draw of the chance to be given a shared pair (see `next_pair`)."""
        with self._lock:  # the seeded generator is shared by the server's threads
            return self._draw_shared(shared_fraction)

    def _draw_shared(self, shared_fraction: float) -> bool:
        """`draw_shared` for a caller that holds the lock."""
        return shared_fraction > 0 and self._rng.random() < shared_fraction

    def next_pair(self, rater: str, shared_fraction: float = 0.0, *, shared: bool | None = None
                  ) -> IssuedPair | None:
        """The rater's pending pair, else a newly issued one; None when nothing is prepared.

        With probability `shared_fraction` the rater is given an item another rater has already
        judged (each item goes to at most two raters); this is what inter-rater agreement is
        measured on. A caller that retries while the queue is empty draws once with
        `draw_shared` and passes the outcome as `shared`, so retries do not draw again (each
        retry would be another chance, and shared pairs would be over-served). A pending pair
        is always returned first, so reloading the page (or restarting the server) shows the
        same pair instead of skipping it.
        """
        def issue(db):
            row = db.execute(
                "SELECT issues.id AS pair_id, issues.issued_at, items.* FROM issues "
                "JOIN items ON items.id = issues.item_id "
                "WHERE issues.rater = ? AND issues.judged_at IS NULL "
                "ORDER BY issues.issued_at, issues.rowid LIMIT 1", (rater,)).fetchone()
            if row:
                return _issued(row)
            item = None
            if self._draw_shared(shared_fraction) if shared is None else shared:
                item = db.execute(
                    "SELECT items.id FROM items JOIN judgements ON judgements.item_id = items.id "
                    "WHERE judgements.rater != ? "
                    "AND NOT EXISTS (SELECT 1 FROM issues i WHERE i.item_id = items.id AND i.rater = ?) "
                    "AND (SELECT COUNT(*) FROM issues i WHERE i.item_id = items.id) < 2 "
                    "ORDER BY items.id LIMIT 1", (rater, rater)).fetchone()
            if item is None:
                item = db.execute(
                    "SELECT id FROM items WHERE NOT EXISTS "
                    "(SELECT 1 FROM issues WHERE issues.item_id = items.id) ORDER BY id LIMIT 1").fetchone()
            if item is None:
                return None
            pair_id, now = secrets.token_urlsafe(18), time.time()
            db.execute("INSERT INTO issues (id, item_id, rater, issued_at) VALUES (?, ?, ?, ?)",
                       (pair_id, item["id"], rater, now))
            row = db.execute("SELECT issues.id AS pair_id, issues.issued_at, items.* FROM issues "
                             "JOIN items ON items.id = issues.item_id WHERE issues.id = ?",
                             (pair_id,)).fetchone()
            return _issued(row)
        return self._write(issue)

    def judge(self, rater: str, pair_id: str, choice: str, rating=None, comment: str = "") -> Judgement:
        """Record a judgement; only for a pair issued to `rater`, and only once.

        Raises JudgementRejected: 404 when `pair_id` was never issued to this rater (forged
        ids and other raters' pairs look the same, so ids cannot be probed), 409 when it was
        already judged (a replay), 422 for an invalid choice, rating or comment.
        """
        choice, rating, comment = validate_judgement(choice, rating, comment)
        if not isinstance(pair_id, str) or not pair_id:
            raise JudgementRejected("pair_id is missing", 422)

        def record(db):
            issue = db.execute("SELECT * FROM issues WHERE id = ?", (pair_id,)).fetchone()
            if issue is None or issue["rater"] != rater:
                raise JudgementRejected("no such pair was issued to you; reload the page for a new pair", 404)
            if issue["judged_at"] is not None:
                raise JudgementRejected("this pair was already judged; each pair is judged once", 409)
            now = time.time()
            db.execute("UPDATE issues SET judged_at = ? WHERE id = ?", (now, pair_id))
            item = db.execute("SELECT * FROM items WHERE id = ?", (issue["item_id"],)).fetchone()
            cur = db.execute(
                "INSERT INTO judgements (issue_id, item_id, rater, choice, rating, comment, prompt, "
                "completion_a, completion_b, checkpoint_a, checkpoint_b, sampling, issued_at, judged_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (pair_id, item["id"], rater, choice, rating, comment, item["prompt"], item["completion_a"],
                 item["completion_b"], item["checkpoint_a"], item["checkpoint_b"], item["sampling"],
                 issue["issued_at"], now))
            return cur.lastrowid
        row_id = self._write(record)
        return _judgements(self._read("SELECT * FROM judgements WHERE id = ?", (row_id,)))[0]

    def judgements(self, rater: str | None = None) -> list[Judgement]:
        """Every judgement (or one rater's), oldest first."""
        if rater is None:
            return _judgements(self._read("SELECT * FROM judgements ORDER BY id"))
        return _judgements(self._read("SELECT * FROM judgements WHERE rater = ? ORDER BY id", (rater,)))

    # ------------------------------------------------------------------ sign-in sessions

    def create_session(self, rater: str, ttl_s: float) -> str:
        """A new random session id for `rater`, valid for `ttl_s` seconds (only its hash is stored)."""
        session, now = secrets.token_urlsafe(32), time.time()

        def insert(db):
            db.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
            db.execute("INSERT INTO sessions (id_hash, rater, created_at, expires_at) VALUES (?, ?, ?, ?)",
                       (_digest(session), rater, now, now + ttl_s))
        self._write(insert)
        return session

    def session_rater(self, session: str | None) -> str | None:
        """The rater of a live session id; None for an unknown, signed-out or expired one."""
        if not session:
            return None
        rows = self._read("SELECT rater FROM sessions WHERE id_hash = ? AND expires_at > ?",
                          (_digest(session), time.time()))
        return rows[0]["rater"] if rows else None

    def end_session(self, session: str) -> None:
        self._write(lambda db: db.execute("DELETE FROM sessions WHERE id_hash = ?", (_digest(session),)))

    def judged_count(self, rater: str | None = None) -> int:
        if rater is None:
            return self._read("SELECT COUNT(*) FROM judgements")[0][0]
        return self._read("SELECT COUNT(*) FROM judgements WHERE rater = ?", (rater,))[0][0]


def _digest(session: str) -> str:
    return hashlib.sha256(session.encode()).hexdigest()


def _judgements(rows) -> list[Judgement]:
    return [Judgement(id=r["id"], pair_id=r["issue_id"], item_id=r["item_id"], rater=r["rater"],
                      choice=r["choice"], rating=r["rating"], comment=r["comment"], prompt=r["prompt"],
                      completion_a=r["completion_a"], completion_b=r["completion_b"],
                      checkpoint_a=r["checkpoint_a"], checkpoint_b=r["checkpoint_b"],
                      sampling=json.loads(r["sampling"]), issued_at=r["issued_at"],
                      judged_at=r["judged_at"]) for r in rows]


def _issued(row: sqlite3.Row) -> IssuedPair:
    return IssuedPair(pair_id=row["pair_id"], prompt=row["prompt"], completion_a=row["completion_a"],
                      completion_b=row["completion_b"], issued_at=row["issued_at"])
