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


def torchrun_under_nccl_rule(argv: list[str], log: str, *, nproc: int = 2, device: str = "cpu",
                             pythonpath: tuple = (), timeout: float = 600) -> list[list[str]]:
    """`palm-rlhf ARGV` in `nproc` torchrun processes under the NCCL rule (tests/runtime/nccl_rule.py,
    which must be importable: it is added to PYTHONPATH with `pythonpath`); returns the collectives it
    let through, one (name, caller file:line, device) per line of `log`.rankN, after checking it saw
    some on `device` only."""
    import os
    import sys
    from pathlib import Path

    rule_dir = Path(__file__).resolve().parents[1] / "runtime"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NCCL_RULE_DEVICE": device, "NCCL_RULE_LOG": log,
           "PYTHONPATH": os.pathsep.join([str(rule_dir), *map(str, pythonpath), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "nccl_rule", *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = [line.split("\t") for r in range(nproc) for line in Path(f"{log}.rank{r}").read_text().splitlines()]
    assert seen, "the rule saw no collective: it was not armed"
    assert {d for _, _, d in seen} == {device if device == "cpu" else "cuda:0"}
    return seen


def palm_rlhf_cli(*args, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m palm_rlhf ARGS` in a fresh process, as a user runs it; with `check`, assert it exited 0."""
    import sys

    out = subprocess.run([sys.executable, "-m", "palm_rlhf", *map(str, args)], capture_output=True, text=True,
                         timeout=timeout)
    if check:
        assert out.returncode == 0, out.stderr[-2000:]
    return out
