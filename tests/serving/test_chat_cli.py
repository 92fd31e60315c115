"""`palm-rlhf chat` driven through a pipe: turns, /reset, /exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from palm_rlhf.model import PaLM

ROOT = Path(__file__).resolve().parents[2]


def chat(model_dir, text: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "palm_rlhf", "chat", str(model_dir), "--threads", "1",
                           "--seed", "3", "--max-tokens", "12", *extra], input=text, capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_two_turns_reset_and_exit_through_a_pipe(tmp_path):
    torch.manual_seed(0)
    PaLM(dim=32, num_tokens=256, depth=2, heads=2, dim_head=16).save_pretrained(tmp_path / "m")
    # the last line is never read: /exit ends the session first
    done = chat(tmp_path / "m", "Hello there\nHow are you\n/reset\nHello there\n/exit\nnot read\n",
                "--system", "Be kind.")
    assert done.returncode == 0, done.stderr
    replies = done.stdout.split("\n")
    assert len(replies) == 4 and replies[-1] == ""  # three replies, one line each
    # after /reset the same first message (same seed, empty history) gets the same reply
    assert replies[2] == replies[0]
    assert "[conversation reset]" in done.stderr
    # the end of the input (Ctrl-D on a terminal) ends the session too
    once = chat(tmp_path / "m", "Hello there\n", "--system", "Be kind.")
    assert once.returncode == 0 and once.stdout == replies[0] + "\n"


def test_history_is_trimmed_with_a_notice(tmp_path):
    torch.manual_seed(0)
    PaLM(dim=32, num_tokens=256, depth=1, heads=2, dim_head=16).save_pretrained(tmp_path / "m")
    done = chat(tmp_path / "m", "".join(f"this is message {i}\n" for i in range(5)), "--context", "80")
    assert done.returncode == 0, done.stderr
    assert "[dropped the oldest" in done.stderr and done.stdout.count("\n") == 5
