"""A real uvicorn server on 127.0.0.1: many concurrent raters, and SIGKILL in mid-session."""

from __future__ import annotations

import signal
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from feedback_testing import judge_loop, write_raters


def rows(db) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT issue_id, rater FROM judgements").fetchall()


@pytest.mark.slow
def test_20_clients_50_judgements_each(tmp_path, server_factory):
    names = [f"rater{i:02d}" for i in range(20)]
    tokens = write_raters(tmp_path / "raters.txt", names)
    server = server_factory(tmp_path / "f.sqlite", tmp_path / "raters.txt", "--queue-size", "32")
    acknowledged: dict[str, list] = {n: [] for n in names}
    errors: list = []
    with ThreadPoolExecutor(max_workers=20) as pool:
        futures = [pool.submit(judge_loop, server.url, tokens[n], 50, acknowledged[n], errors) for n in names]
        for f in futures:
            f.result(timeout=300)
    assert errors == []
    got = rows(tmp_path / "f.sqlite")
    assert len(got) == 1000
    assert len({pair_id for pair_id, _ in got}) == 1000                      # no pair judged twice
    assert sorted(got) == sorted((p, n) for n, ps in acknowledged.items() for p in ps)
    with sqlite3.connect(tmp_path / "f.sqlite") as con:                      # every judgement has its own item
        assert con.execute("SELECT COUNT(DISTINCT item_id) FROM judgements").fetchone()[0] == 1000


@pytest.mark.slow
def test_sigkill_loses_no_acknowledged_judgement(tmp_path, server_factory):
    tokens = write_raters(tmp_path / "raters.txt", ["alice", "bob"])
    db = tmp_path / "f.sqlite"
    server = server_factory(db, tmp_path / "raters.txt")
    acknowledged: list = []
    errors: list = []
    stop = threading.Event()
    # alice judges as fast as she can while the server is killed under her
    worker = threading.Thread(target=judge_loop, args=(server.url, tokens["alice"], 10_000, acknowledged, errors, stop))
    worker.start()
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {tokens['bob']}"}) as bob:
        pending = bob.get("/api/next").json()["pair"]   # issued to bob, not judged yet
        while len(acknowledged) < 20 and worker.is_alive():
            threading.Event().wait(0.02)
        server.kill(signal.SIGKILL)
    stop.set()
    worker.join(timeout=60)
    assert errors == [] and len(acknowledged) >= 20

    stored = {pair_id for pair_id, _ in rows(db)}
    assert set(acknowledged) <= stored           # every "ok" the server sent is on disk
    assert len(stored) - len(acknowledged) <= 1  # at most the one in flight when it died

    restarted = server_factory(db, tmp_path / "raters.txt")
    with httpx.Client(base_url=restarted.url, headers={"Authorization": f"Bearer {tokens['bob']}"}) as bob:
        again = bob.get("/api/next").json()["pair"]
        assert again == pending                  # bob's pending pair survived the crash
        assert bob.post("/api/judge", json={"pair_id": again["pair_id"], "choice": "a"}).status_code == 200
    with httpx.Client(base_url=restarted.url, headers={"Authorization": f"Bearer {tokens['alice']}"}) as alice:
        replay = alice.post("/api/judge", json={"pair_id": acknowledged[0], "choice": "b"})
        assert replay.status_code == 409         # judgements from before the crash still count as done
    assert {p for p, _ in rows(db)} == stored | {pending["pair_id"]}
