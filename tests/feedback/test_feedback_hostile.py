"""Hostile input to the feedback app, in-process (issue 16, items 8-11 and 13).

Ratings: only integers 1-5 (no floats, no JSON booleans, no infinities). Bodies: JSON that is
too deep is a 400, JSON sent under another content type is a 415. Sessions: the cookie is a
random server-side id, revoked at sign-out and expiring. Host headers and failed sign-ins are
limited.
"""

from __future__ import annotations

import re

import pytest
from feedback_testing import FakePairSource, TOKENS, write_raters
from starlette.testclient import TestClient

import palm_rlhf.feedback.store as store_module
from palm_rlhf.feedback.app import SESSION_COOKIE, create_app
from palm_rlhf.feedback.auth import SignInLimiter, csrf_token, read_raters
from palm_rlhf.feedback.pairs import PairQueue
from palm_rlhf.feedback.store import FeedbackStore

BASE = "http://testserver"
JSON = {"content-type": "application/json"}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def make(tmp_path):
    def make(**kwargs):
        write_raters(tmp_path / "raters.txt", ["alice", "bob"])
        store = FeedbackStore(tmp_path / "f.sqlite", seed=0)
        queue = PairQueue(store, FakePairSource(), ["p0", "p1"], size=4)
        kwargs = {"max_body_bytes": 64 * 1024, "wait_s": 5.0, "allowed_hosts": ["testserver"], **kwargs}
        return store, create_app(store, queue, read_raters(tmp_path / "raters.txt"), shared_fraction=0.0, **kwargs)
    return make


def bearer(name="alice", **extra):
    return {"Authorization": f"Bearer {TOKENS[name]}", **extra}


def next_pair_id(c, headers=None) -> str:
    return c.get("/api/next?wait=5", headers=headers if headers is not None else bearer()).json()["pair"]["pair_id"]


def login(c, name="alice", token=None):
    page = c.get("/login")  # each sign-in form carries a fresh CSRF token
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    return c.post("/login", data={"token": token or TOKENS[name], "csrf": csrf}, follow_redirects=False)


@pytest.mark.parametrize("rating,status", [
    (b"1e999", 422), (b"-1e999", 422), (b"Infinity", 400), (b"-Infinity", 400), (b"NaN", 400),  # item 8
    (b"2.5", 422), (b"4.0", 422), (b"true", 422), (b"false", 422), (b"0", 422), (b"6", 422),      # item 10
    (b'"2.5"', 422), (b"[3]", 422), (b"{}", 422)])
def test_only_integer_ratings_1_to_5(make, rating, status):
    store, app = make()
    with TestClient(app, base_url=BASE) as c:
        pair_id = next_pair_id(c)
        for pid in (pair_id.encode(), b"not-an-issued-pair"):  # ratings are checked before ownership
            body = b'{"pair_id": "%s", "choice": "a", "rating": %s}' % (pid, rating)
            r = c.post("/api/judge", headers=bearer(**JSON), content=body)
            assert r.status_code == status, r.text
            assert "error" in r.json()
        ok = c.post("/api/judge", headers=bearer(**JSON), content=b'{"pair_id": "%s", "choice": "b", '
                                                                   b'"rating": 5, "next": false}' % pair_id.encode())
        assert ok.status_code == 200
    assert [(j.choice, j.rating) for j in store.judgements()] == [("b", 5)]


def test_form_ratings_are_digits_1_to_5(make):
    store, app = make()
    with TestClient(app, base_url=BASE) as c:
        login(c)
        good = csrf_token(store.secret(), "alice")
        pair_id = next_pair_id(c, headers={})
        for rating in ("2.5", "true", "0", "1e999"):
            r = c.post("/judge", data={"pair_id": pair_id, "choice": "a", "rating": rating, "csrf": good},
                       follow_redirects=False)
            assert r.status_code == 422, rating
        r = c.post("/judge", data={"pair_id": pair_id, "choice": "a", "rating": " 3 ", "csrf": good},
                   follow_redirects=False)
        assert r.status_code == 303
    assert [j.rating for j in store.judgements()] == [3]


def test_deeply_nested_json_is_a_400(make):
    store, app = make()
    with TestClient(app, base_url=BASE) as c:
        for body in (b"[" * 30_000, b'{"pair_id": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"):
            r = c.post("/api/judge", headers=bearer(**JSON), content=body)
            assert r.status_code == 400 and "error" in r.json()
        r = c.post("/api/judge", headers=bearer(**JSON), content=b"\xff\xfe{")
        assert r.status_code == 400
    assert store.judged_count() == 0


def test_content_types_are_required(make):
    store, app = make()
    with TestClient(app, base_url=BASE) as c:
        pair_id = next_pair_id(c)
        body = b'{"pair_id": "%s", "choice": "a"}' % pair_id.encode()
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            headers = bearer(**({"content-type": kind} if kind else {}))
            assert c.post("/api/judge", headers=headers, content=body).status_code == 415, kind
        # the same with a browser session and a valid CSRF header
        assert login(c, "bob").status_code == 303
        good = csrf_token(store.secret(), "bob")
        bob_pair = next_pair_id(c, headers={})
        body = b'{"pair_id": "%s", "choice": "a"}' % bob_pair.encode()
        r = c.post("/api/judge", headers={"X-CSRF-Token": good, "content-type": "text/plain"}, content=body)
        assert r.status_code == 415
        # and the form paths take only form bodies
        r = c.post("/judge", headers={"content-type": "application/json"},
                   content=b'{"pair_id": "%s", "choice": "a", "csrf": "%s"}' % (bob_pair.encode(), good.encode()))
        assert r.status_code == 415
        assert c.post("/login", json={"token": TOKENS["alice"]}).status_code == 415
        assert c.post("/logout", json={"csrf": good}).status_code == 415
        assert store.judged_count() == 0
        r = c.post("/api/judge", headers={"X-CSRF-Token": good, "content-type": "application/json; charset=utf-8"},
                   content=body)
        assert r.status_code == 200
        r = c.post("/api/judge", headers=bearer(**JSON), content=b'{"pair_id": "%s", "choice": "a", "next": false}'
                   % pair_id.encode())
        assert r.status_code == 200
    assert store.judged_count() == 2


def test_session_cookie_is_a_revocable_server_side_id(make, monkeypatch):
    store, app = make(session_hours=12.0)
    with TestClient(app, base_url=BASE) as c:
        r = login(c)
        session = r.cookies[SESSION_COOKIE]
        assert session != TOKENS["alice"] and len(session) >= 40
        assert "max-age=43200" in r.headers["set-cookie"].lower()
        assert c.get("/").status_code == 200
        r = c.post("/logout", data={"csrf": csrf_token(store.secret(), "alice")}, follow_redirects=False)
        assert r.status_code == 303

    with TestClient(app, base_url=BASE) as thief:  # a copy of the cookie, after sign-out
        thief.cookies.set(SESSION_COOKIE, session)
        assert thief.get("/").status_code == 401
        assert thief.get("/api/next").status_code == 401
        thief.cookies.set(SESSION_COOKIE, TOKENS["alice"])  # the raw token is not a session either
        assert thief.get("/api/next").status_code == 401

    with TestClient(app, base_url=BASE) as c:  # sessions expire
        login(c)
        assert c.get("/api/stats").status_code == 200
        real = store_module.time.time

        class Later:
            @staticmethod
            def time():
                return real() + 12 * 3600 + 1
        monkeypatch.setattr(store_module, "time", Later)
        assert c.get("/api/stats").status_code == 401
    # only a hash of the session id is stored
    assert session not in (store.path.read_bytes() + store.path.with_name("f.sqlite-wal").read_bytes()).decode(
        "latin-1")


@pytest.mark.parametrize("host,status", [("evil.example", 400), ("evil.example:8000", 400),
                                         ("127.0.0.1.evil.example", 400), ("", 400),
                                         ("127.0.0.1:8000", 401), ("[::1]:8000", 401), ("localhost:8000", 401),
                                         ("10.1.2.3", 401), ("testserver", 401), ("TestServer:80", 401)])
def test_host_header_is_checked(make, host, status):
    store, app = make()
    with TestClient(app, base_url=BASE) as c:
        r = c.get("/api/next", headers={"host": host})
        assert r.status_code == status, r.text
        if status == 400:
            assert "--allowed-host" in r.json()["error"]
            assert c.post("/api/judge", headers=bearer(host=host, **JSON), content=b"{}").status_code == 400


def test_failed_sign_ins_are_limited_per_client(make):
    clock = Clock()
    store, app = make(limiter=SignInLimiter(limit=3, window_s=60.0, clock=clock))
    with TestClient(app, base_url=BASE) as c:
        assert login(c, token="wrong-token-0000000").status_code == 401
        wrong = {"Authorization": "Bearer wrong-token-0000000"}
        assert c.get("/api/next", headers=wrong).status_code == 401
        assert c.get("/api/stats", headers=wrong).status_code == 401
        # the limit is reached: even the right token is refused, so guessing learns nothing more
        r = login(c)
        assert r.status_code == 429 and int(r.headers["retry-after"]) == 60
        r = c.get("/api/stats", headers=bearer())
        assert r.status_code == 429 and "try again in 60 s" in r.json()["error"]
        clock.now += 59.5
        assert c.get("/api/stats", headers=bearer()).status_code == 429
        clock.now += 1.0  # the first failure left the window
        assert c.get("/api/stats", headers=bearer()).status_code == 200
        assert login(c).status_code == 303


def test_limiter_counts_each_client_alone():
    clock = Clock()
    limiter = SignInLimiter(limit=2, window_s=10.0, clock=clock)
    for _ in range(2):
        limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == 10 and limiter.retry_after("10.0.0.2") == 0
    clock.now += 10.0
    assert limiter.retry_after("10.0.0.1") == 0
