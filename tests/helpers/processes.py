"""Subprocesses that print a line when they are ready (servers, CLI commands under test)."""

from __future__ import annotations

import subprocess
import threading
import time


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


def wait_healthy(url: str, proc, lines, timeout: float = 30.0) -> None:
    """Poll `url`/healthz until it answers 200; RuntimeError (with `lines`, its output) if `proc` exits
    or `timeout` seconds pass."""
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
