"""HTTP behaviour of the app in-process: auth, CSRF, judgement rules, size limit, escaping, stats."""

from __future__ import annotations

import html
import re
import time

import pytest
from feedback_testing import FakePairSource, TOKENS, fake_server, write_raters
from starlette.testclient import TestClient

from palm_rlhf.feedback.app import SESSION_COOKIE, create_app
from palm_rlhf.feedback.auth import csrf_token, read_raters
from palm_rlhf.feedback.pairs import PairQueue
from palm_rlhf.feedback.store import FeedbackStore

BASE = "http://testserver"


@pytest.fixture
def setup(tmp_path):
    def make(xss=False, two=False, shared=0.0, queue_size=4):
        write_raters(tmp_path / "raters.txt", ["alice", "bob"])
        store = FeedbackStore(tmp_path / "f.sqlite", seed=0)
        prompts = [fake_server.XSS_PROMPT] if xss else ["p0", "p1", "p2"]
        queue = PairQueue(store, FakePairSource(xss, two), prompts, size=queue_size)
        app = create_app(store, queue, read_raters(tmp_path / "raters.txt"), shared_fraction=shared,
                         max_body_bytes=2048, wait_s=5.0, allowed_hosts=["testserver"])
        return store, app
    return make


def bearer(name):
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def test_missing_or_wrong_token_is_401(setup):
    store, app = setup()
    with TestClient(app, base_url=BASE) as c:
        assert c.get("/").status_code == 401                     # the sign-in page, with 401
        assert "Sign in" in c.get("/").text
        assert c.get("/stats").status_code == 401
        assert c.get("/api/next").status_code == 401
        assert c.post("/api/judge", json={"pair_id": "x", "choice": "a"}).status_code == 401
        assert c.get("/api/next", headers={"Authorization": "Bearer nope-nope-nope-nope"}).status_code == 401
        assert c.get("/api/next", headers={"Authorization": f"Basic {TOKENS['alice']}"}).status_code == 401
        c.cookies.set(SESSION_COOKIE, "not-a-token")
        assert c.get("/").status_code == 401
    assert store.judged_count() == 0


def test_pairs_are_prepared_before_anyone_asks(setup):
    store, app = setup(queue_size=4)
    with TestClient(app, base_url=BASE) as c:
        assert c.get("/api/next?wait=5", headers=bearer("alice")).json()["pair"] is not None
        # the producer refills to the queue size in the background
        for _ in range(100):
            if store.ready_count() == 4:
                break
            time.sleep(0.05)
        assert store.ready_count() == 4


def test_api_forged_replayed_cross_rater_rejected(setup):
    store, app = setup()
    with TestClient(app, base_url=BASE) as c:
        pair = c.get("/api/next", headers=bearer("alice")).json()["pair"]
        assert c.post("/api/judge", headers=bearer("alice"),
                      json={"pair_id": "AAAAAAAAAAAAAAAAAAAAAAAA", "choice": "a"}).status_code == 404
        assert c.post("/api/judge", headers=bearer("bob"), json={"pair_id": pair["pair_id"], "choice": "a"}).status_code == 404
        ok = c.post("/api/judge", headers=bearer("alice"), json={"pair_id": pair["pair_id"], "choice": "b", "rating": 2})
        assert ok.status_code == 200 and ok.json()["progress"]["you"] == 1
        assert ok.json()["next"]["pair_id"] != pair["pair_id"]       # the next pair comes with the answer
        replay = c.post("/api/judge", headers=bearer("alice"), json={"pair_id": pair["pair_id"], "choice": "a"})
        assert replay.status_code == 409
        assert c.post("/api/judge", headers={**bearer("alice"), "content-type": "application/json"},
                      content=b"[1, 2]").status_code == 400
        assert c.post("/api/judge", headers=bearer("alice"), json={"pair_id": ok.json()["next"]["pair_id"],
                                                                  "choice": "maybe"}).status_code == 422
    [j] = store.judgements()
    assert (j.rater, j.pair_id, j.choice, j.rating) == ("alice", pair["pair_id"], "b", 2)


def _login(c, name):
    page = c.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    return c.post("/login", data={"token": TOKENS[name], "csrf": csrf}, follow_redirects=False)


def test_login_and_form_posts_need_csrf(setup):
    store, app = setup()
    with TestClient(app, base_url=BASE) as c:
        assert c.post("/login", data={"token": TOKENS["alice"], "csrf": "wrong"}).status_code == 403
        page = c.get("/login")  # each sign-in form carries a fresh token (also set as a cookie)
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        assert c.post("/login", data={"token": "bad-token-bad-token", "csrf": csrf}).status_code == 401
        r = _login(c, "alice")
        assert r.status_code == 303 and SESSION_COOKIE in r.cookies
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie

        page = c.get("/")
        assert page.status_code == 200
        pair_id = re.search(r'name="pair_id" id="pair-id" value="([^"]+)"', page.text).group(1)
        good_csrf = csrf_token(store.secret(), "alice")
        assert f'value="{good_csrf}"' in page.text
        form = {"pair_id": pair_id, "choice": "a", "rating": "", "comment": "ok"}
        assert c.post("/judge", data=form, follow_redirects=False).status_code == 403                # no token
        assert c.post("/judge", data={**form, "csrf": csrf_token(store.secret(), "bob")},
                      follow_redirects=False).status_code == 403                                     # bob's token
        assert c.post("/judge", data={**form, "csrf": good_csrf}, headers={"Origin": "http://evil.example"},
                      follow_redirects=False).status_code == 403                                     # foreign origin
        # the page's script posts JSON with the session cookie: it must send the CSRF header
        assert c.post("/api/judge", json={"pair_id": pair_id, "choice": "a"}).status_code == 403
        assert store.judged_count() == 0
        r = c.post("/judge", data={**form, "csrf": good_csrf}, headers={"Origin": BASE}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/"
        assert c.post("/judge", data={**form, "csrf": good_csrf}).status_code == 409                 # replay
        nxt = c.get("/api/next").json()["pair"]["pair_id"]
        r = c.post("/api/judge", json={"pair_id": nxt, "choice": "tie"}, headers={"X-CSRF-Token": good_csrf})
        assert r.status_code == 200
    assert [(j.choice, j.comment) for j in store.judgements()] == [("a", "ok"), ("tie", "")]


def test_oversized_bodies_get_413(setup):
    store, app = setup()
    with TestClient(app, base_url=BASE) as c:
        pair = c.get("/api/next", headers=bearer("alice")).json()["pair"]
        big = {"pair_id": pair["pair_id"], "choice": "a", "comment": "x" * 5000}
        assert c.post("/api/judge", headers=bearer("alice"), json=big).status_code == 413

        def chunks():  # no Content-Length: the limit is enforced while reading
            for _ in range(10):
                yield b"x" * 1000
        assert c.post("/api/judge", headers={**bearer("alice"), "content-type": "application/json"},
                      content=chunks()).status_code == 413
        assert c.post("/login", content=b"token=" + b"x" * 4000,
                      headers={"content-type": "application/x-www-form-urlencoded"}).status_code == 413
    assert store.judged_count() == 0


def test_model_text_and_prompts_are_escaped(setup):
    store, app = setup(xss=True)
    with TestClient(app, base_url=BASE) as c:
        _login(c, "alice")
        page = c.get("/")
        assert page.status_code == 200
        assert "<script>window" not in page.text and "onerror=" not in page.text.replace("onerror=&#34;", "")
        assert "<img" not in page.text and "<svg" not in page.text
        # each text sits, escaped, as the only content of its element and unescapes to the original
        for element, text in [("prompt", fake_server.XSS_PROMPT), ("completion-a", fake_server.XSS_A + " #0"),
                              ("completion-b", fake_server.XSS_B + " #0")]:
            shown = re.search(rf'<div id="{element}" class="text">(.*?)</div>', page.text, re.S).group(1)
            assert "<" not in shown and html.unescape(shown) == text
        assert "script-src 'self'" in page.headers["content-security-policy"]


def test_stats_page_and_api(setup):
    store, app = setup(two=True, shared=1.0)
    with TestClient(app, base_url=BASE) as c:
        p = c.get("/api/next", headers=bearer("alice")).json()["pair"]
        c.post("/api/judge", headers=bearer("alice"), json={"pair_id": p["pair_id"], "choice": "a", "next": False})
        q = c.get("/api/next", headers=bearer("bob")).json()["pair"]
        assert q["prompt"] == p["prompt"] and q["completion_a"] == p["completion_a"]   # a shared pair
        c.post("/api/judge", headers=bearer("bob"), json={"pair_id": q["pair_id"], "choice": "a", "next": False})
        stats = c.get("/api/stats", headers=bearer("bob")).json()
        assert stats["total"] == 2 and stats["agreement"] == 1.0 and stats["shared_items"] == 1
        # both judged side A = fake-1 over fake-2 -> fake-1 2 wins, fake-2 2 losses
        assert [(s["checkpoint"], s["wins"], s["losses"], s["win_rate"]) for s in stats["checkpoints"]] == [
            ("fake-1", 2, 0, 1.0), ("fake-2", 0, 2, 0.0)]
        _login(c, "alice")
        page = c.get("/stats")
        assert page.status_code == 200 and "100.0%" in page.text and "fake-2" in page.text
