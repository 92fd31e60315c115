"""Rater tokens, CSRF tokens and the limit on failed sign-ins.

A raters file has one rater per line, `name token`; `#` starts a comment. Tokens are random
secrets (`make_token()`: 32 bytes from `secrets`, URL-safe base64), made by
`palm-rlhf feedback add-rater NAME --raters FILE`. The server compares tokens in constant time.

CSRF: a form post must carry `csrf_token(secret, rater)`, an HMAC of the rater's name under
a secret kept in the database. A page on another site cannot read it, so it cannot forge a
post that the rater's browser would send with the session cookie.

Failed sign-ins (a wrong token on `/login` or in `Authorization: Bearer`) are counted per
client address: after `limit` failures within `window_s` seconds, every sign-in attempt from
that address gets 429 until the oldest failure is `window_s` old.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import deque
from pathlib import Path

from ..errors import DataError

NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_TOKEN_CHARS = 16


def make_token() -> str:
    return secrets.token_urlsafe(32)


def read_raters(path) -> dict[str, str]:
    """{token: rater name}; DataError with the line number for a malformed line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"--raters {path}: cannot read ({e.strerror or e}); create it with "
                        "`palm-rlhf feedback add-rater NAME --raters FILE`") from e
    tokens: dict[str, str] = {}
    names: set[str] = set()
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{path}:{number}: expected `name token`, got {len(parts)} fields")
        name, token = parts
        if not NAME_RE.match(name):
            raise DataError(f"{path}:{number}: rater name {name!r} must be 1-64 of A-Z a-z 0-9 _ . @ -")
        if len(token) < MIN_TOKEN_CHARS:
            raise DataError(f"{path}:{number}: token of {name!r} is shorter than {MIN_TOKEN_CHARS} "
                            "characters; make one with `palm-rlhf feedback add-rater`")
        if name in names:
            raise DataError(f"{path}:{number}: rater {name!r} is listed twice")
        if token in tokens:
            raise DataError(f"{path}:{number}: token of {name!r} is already used by {tokens[token]!r}")
        names.add(name)
        tokens[token] = name
    if not tokens:
        raise DataError(f"--raters {path}: no raters; add one with `palm-rlhf feedback add-rater NAME`")
    return tokens


def add_rater(path, name: str) -> str:
    """Append `name <new token>` to the raters file (created if missing); return the token."""
    if not NAME_RE.match(name):
        raise DataError(f"rater name {name!r} must be 1-64 of A-Z a-z 0-9 _ . @ -")
    path = Path(path)
    if path.exists() and name in read_raters(path).values():
        raise DataError(f"{path}: rater {name!r} already exists; pick another name")
    token = make_token()
    existing = path.read_text(encoding="utf-8") if path.exists() else ""
    if existing and not existing.endswith("\n"):
        existing += "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(existing + f"{name} {token}\n", encoding="utf-8")
    path.chmod(0o600)  # the file holds secrets
    return token


def find_rater(tokens: dict[str, str], presented: str | None) -> str | None:
    """The rater whose token equals `presented`, compared in constant time per token."""
    if not presented:
        return None
    found = None
    for token, name in tokens.items():
        if hmac.compare_digest(token.encode(), presented.encode()):
            found = name
    return found


def csrf_token(secret: bytes, rater: str) -> str:
    return hmac.new(secret, f"csrf:{rater}".encode(), hashlib.sha256).hexdigest()


def csrf_ok(secret: bytes, rater: str, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(csrf_token(secret, rater), presented)


class SignInLimiter:
    """Counts failed sign-ins per client address in a sliding window (thread-safe, in memory)."""

    MAX_CLIENTS = 10_000  # past this many addresses, the ones without a recent failure are forgotten

    def __init__(self, limit: int = 10, window_s: float = 600.0, clock=time.monotonic):
        if limit < 1 or window_s <= 0:
            raise ValueError(f"SignInLimiter(limit={limit}, window_s={window_s}): both must be positive")
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._failures: dict[str, deque] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque:
        times = self._failures.get(client, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def retry_after(self, client: str) -> int:
        """0 when `client` may try to sign in, else the seconds until it may try again."""
        with self._lock:
            now = self.clock()
            times = self._recent(client, now)
            if len(times) < self.limit:
                return 0
            return max(1, int(times[-self.limit] + self.window_s - now + 0.999))

    def failed(self, client: str) -> None:
        with self._lock:
            now = self.clock()
            if client not in self._failures and len(self._failures) >= self.MAX_CLIENTS:
                for other in [c for c in self._failures if not self._recent(c, now)]:
                    del self._failures[other]
            times = self._recent(client, now)
            times.append(now)
            self._failures[client] = times
