"""`palm-rlhf feedback` end to end: a real (tiny, random) PaLM behind `serve`, then `export`,
then the exported file is read by `read_preferences` and trains a reward model for a step."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import sys

import httpx
import pytest
import torch
from feedback_testing import ROOT, write_raters
from tests.helpers.processes import launch

from palm_rlhf.cli.main import main
from palm_rlhf.data.preferences import PairwiseRecord, read_preferences
from palm_rlhf.feedback.pairs import checkpoint_identity
from palm_rlhf.feedback.store import FeedbackStore
from palm_rlhf.model import PaLM


def tiny_checkpoint(path, seed):
    torch.manual_seed(seed)
    return PaLM(num_tokens=256, dim=32, depth=1, heads=2, dim_head=16).save_pretrained(path)


def serve(*args, timeout=120.0):
    cmd = [sys.executable, "-m", "palm_rlhf.cli.main", "feedback", "serve", "--port", "0", *map(str, args)]
    proc, lines = launch(cmd, "feedback app on http://", timeout=timeout, cwd=ROOT,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = re.search(r"http://[\d.]+:\d+", "".join(lines)).group(0)
    return proc, url, lines


@pytest.mark.slow
def test_serve_two_checkpoints_judge_and_export(tmp_path, capsys):
    a, b = tiny_checkpoint(tmp_path / "ckpt_a", 0), tiny_checkpoint(tmp_path / "ckpt_b", 1)
    (tmp_path / "prompts.txt").write_text("Once upon a time\nThe answer is\n")
    tokens = write_raters(tmp_path / "raters.txt", ["alice"])
    db = tmp_path / "f.sqlite"
    proc, url, lines = serve("--checkpoint", a, "--checkpoint", b, "--prompts", tmp_path / "prompts.txt",
                             "--raters", tmp_path / "raters.txt", "--db", db, "--max-new-tokens", "8",
                             "--queue-size", "2", "--seed", "0", "--allowed-host", "rating.example.org")
    try:
        assert url.startswith("http://127.0.0.1:")   # loopback unless told otherwise
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens['alice']}"}, timeout=60) as c:
            assert c.get("/api/stats", headers={"host": "rating.example.org"}).status_code == 200
            assert c.get("/api/stats", headers={"host": "rebound.example.org:8000"}).status_code == 400
            pair = c.get("/api/next", params={"wait": 60}).json()["pair"]
            for choice in ["a", "b", "tie", "a"]:
                assert pair is not None, "".join(lines)
                assert pair["prompt"] in ("Once upon a time", "The answer is")
                r = c.post("/api/judge", json={"pair_id": pair["pair_id"], "choice": choice, "rating": 3})
                assert r.status_code == 200, r.text
                pair = r.json()["next"] or c.get("/api/next", params={"wait": 60}).json()["pair"]
    finally:
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status reports it
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM), "".join(lines)

    identities = {checkpoint_identity(a), checkpoint_identity(b)}
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT checkpoint_a, checkpoint_b, sampling FROM judgements").fetchall()
    assert len(rows) == 4
    assert all({ca, cb} == identities for ca, cb, _ in rows)          # one side from each model
    assert all('"max_new_tokens": 8' in s for _, _, s in rows)

    out = tmp_path / "prefs.jsonl"
    assert main(["feedback", "export", "--db", str(db), "--out", str(out), "--margin-from-rating"]) == 0
    assert "wrote 3 preference records" in capsys.readouterr().out   # the tie is not a preference
    records = read_preferences(out)
    assert len(records) == 3 and all(isinstance(r, PairwiseRecord) for r in records)
    assert all(r.annotator == "alice" and r.margin == 0.5 and " vs " in r.source for r in records)


def test_exported_judgements_train_a_reward_model(tmp_path, capsys):
    """export -> `palm-rlhf reward train` reads the file and takes optimizer steps on it."""
    store = FeedbackStore(tmp_path / "f.sqlite")
    for i in range(8):
        store.add_item(f"Question {i}: ", f"a clear answer {i}", f"zzz {i}", "m@1", "m@1", {"temperature": 1.0})
        store.judge("alice", store.next_pair("alice").pair_id, "a" if i % 2 else "b")
    store.close()
    out = tmp_path / "prefs.jsonl"
    assert main(["feedback", "export", "--db", str(tmp_path / "f.sqlite"), "--out", str(out)]) == 0
    assert len(read_preferences(out)) == 8
    base = tiny_checkpoint(tmp_path / "base", 0)
    assert main(["reward", "train", f"model={base}", f"data={out}", f"out_dir={tmp_path / 'rm'}",
                 "--no-progress", "max_steps=2", "batch_size=2", "val_fraction=0.25"]) == 0
    assert (tmp_path / "rm" / "final").is_dir()


def test_export_and_add_rater_errors(tmp_path, capsys):
    assert main(["feedback", "export", "--db", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "o")]) == 2
    assert "no such database" in capsys.readouterr().err
    raters = tmp_path / "raters.txt"
    assert main(["feedback", "add-rater", "carol", "--raters", str(raters)]) == 0
    token = capsys.readouterr().out.strip()
    assert raters.read_text() == f"carol {token}\n" and len(token) >= 32
    assert main(["feedback", "add-rater", "carol", "--raters", str(raters)]) == 2


def test_serve_rejects_bad_arguments_before_listening(tmp_path, capsys):
    a = tiny_checkpoint(tmp_path / "ckpt", 0)
    (tmp_path / "p.txt").write_text("\n\n")
    assert main(["feedback", "serve", "--checkpoint", str(a), "--prompts", str(tmp_path / "p.txt")]) == 2
    assert "no prompts" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("hi\n")
    assert main(["feedback", "serve", "--checkpoint", str(tmp_path), "--prompts", str(tmp_path / "p.txt")]) == 2
    assert "no model here" in capsys.readouterr().err
    assert main(["feedback", "serve", "--checkpoint", str(a), "--prompts", str(tmp_path / "p.txt"),
                 "--shared-fraction", "2"]) == 2
    assert "--shared-fraction" in capsys.readouterr().err
