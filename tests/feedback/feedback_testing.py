"""Helpers for the feedback tests: fake pair source, raters files, a real server subprocess, a rater loop.

(A uniquely named module, not conftest.py, so `from feedback_testing import ...` can never pick
up another directory's helpers.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import fake_feedback_server as fake_server  # (also run as a script by start_server)

from tests.helpers.processes import launch, wait_healthy

HERE = Path(__file__).parent
ROOT = HERE.parent.parent

FakePairSource = fake_server.FakePairSource

# fixed, long-enough tokens: tests are readable and the raters file format is exercised
TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab"}


def write_raters(path: Path, names) -> dict[str, str]:
    """Write a raters file for `names`; returns {name: token}."""
    tokens = {n: TOKENS.get(n, f"{n}-token-{'x' * 16}") for n in names}
    path.write_text("".join(f"{n} {t}\n" for n, t in tokens.items()))
    return tokens


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    args: list

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=20)


def start_server(db: Path, raters: Path, *extra: str, timeout: float = 60.0) -> Server:
    """Start fake_feedback_server.py on a free loopback port; wait for its URL line."""
    args = [sys.executable, str(HERE / "fake_feedback_server.py"), "--db", str(db), "--raters", str(raters), *extra]
    # the script's own folder heads its import path: put this checkout's palm_rlhf before an installed one
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc, lines = launch(args, "URL ", timeout=timeout, cwd=ROOT,
                         env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path})
    url = next(l for l in lines if l.startswith("URL "))[4:].strip().rstrip("/")
    wait_healthy(url, proc, lines)
    return Server(url=url, proc=proc, args=args)


def judge_loop(url: str, token: str, n: int, acknowledged: list, errors: list, stop: threading.Event | None = None):
    """Judge `n` pairs as one rater; record every pair id the server acknowledged with 200."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    choices = ["a", "b", "tie", "both_bad"]
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        pair = client.get("/api/next", params={"wait": 10}).json()["pair"]
        for i in range(n):
            if stop is not None and stop.is_set():
                return
            if pair is None:
                errors.append("no pair offered")
                return
            try:
                r = client.post("/api/judge", json={"pair_id": pair["pair_id"], "choice": choices[i % 4]})
            except httpx.HTTPError as e:
                if stop is None:
                    errors.append(repr(e))
                return
            if r.status_code != 200:
                errors.append(f"{r.status_code} {r.text}")
                return
            acknowledged.append(pair["pair_id"])
            pair = r.json()["next"] or client.get("/api/next", params={"wait": 10}).json()["pair"]
