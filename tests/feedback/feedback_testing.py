"""Helpers for the feedback tests: fake pair source, raters files, a real server subprocess.

(A uniquely named module, not conftest.py, so `from feedback_testing import ...` can never pick
up another directory's helpers.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
import fake_feedback_server as fake_server  # noqa: E402  (also run as a script by start_server)

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


def launch(args: list, needle: str, *, timeout: float = 60.0, **popen) -> tuple[subprocess.Popen, list[str]]:
    """Start `args` (stdout and stderr merged) and wait for an output line containing `needle`;
    returns the process and the lines read so far (a thread keeps appending)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    lines: list[str] = []
    seen = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if needle in line:
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    if not seen.wait(timeout):
        proc.kill()
        raise RuntimeError(f"{' '.join(map(str, args))} did not print {needle!r}:\n" + "".join(lines))
    return proc, lines


def start_server(db: Path, raters: Path, *extra: str, timeout: float = 60.0) -> Server:
    """Start fake_feedback_server.py on a free loopback port; wait for its URL line."""
    args = [sys.executable, str(HERE / "fake_feedback_server.py"), "--db", str(db), "--raters", str(raters), *extra]
    proc, lines = launch(args, "URL ", timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = next(l for l in lines if l.startswith("URL "))[4:].strip().rstrip("/")
    wait_healthy(url, proc, lines)
    return Server(url=url, proc=proc, args=args)


def wait_healthy(url: str, proc, lines, timeout: float = 30.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("feedback server exited:\n" + "".join(lines))
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("feedback server never answered /healthz:\n" + "".join(lines))
