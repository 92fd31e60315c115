"""The curl examples of docs/feedback.md's "The JSON API" run against a live server (issue 16, item 14).

Each ```bash block after a `<!-- feedback-api-example: NAME -->` line runs in bash (with `set -euo
pipefail`) with URL and TOKEN set; a ```text block right after it is its exact expected output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from feedback_testing import ROOT, write_raters

DOC = ROOT / "docs" / "feedback.md"
EXAMPLE = re.compile(r"^<!-- feedback-api-example: (\w+) -->\n```bash\n(.*?)^```\n(?:\n```text\n(.*?)^```\n)?",
                     re.DOTALL | re.MULTILINE)


def examples() -> dict[str, tuple[str, str | None]]:
    return {m.group(1): (m.group(2), m.group(3)) for m in EXAMPLE.finditer(DOC.read_text())}


def test_the_examples_are_found():
    found = examples()
    assert list(found) == ["next", "judge", "stats", "errors"]
    assert found["errors"][1] == "415\n422\n404\n400\n" and found["next"][1] is None


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_examples_against_a_live_server(tmp_path, server_factory):
    tokens = write_raters(tmp_path / "raters.txt", ["alice"])
    server = server_factory(tmp_path / "f.sqlite", tmp_path / "raters.txt")
    env = {**os.environ, "URL": server.url, "TOKEN": tokens["alice"],
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # python3 for the judge
    out = {}
    for name, (script, expected) in examples().items():
        proc = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], capture_output=True, text=True,
                              env=env, timeout=60, cwd=tmp_path)
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
        if expected is not None:
            assert proc.stdout == expected, name
        out[name] = proc.stdout

    pair = json.loads(out["next"])["pair"]
    assert set(pair) == {"pair_id", "prompt", "completion_a", "completion_b"}
    judged = json.loads(out["judge"])
    assert judged["ok"] is True and judged["next"] is None
    assert json.loads(out["stats"])["total"] == 1
    with sqlite3.connect(tmp_path / "f.sqlite") as con:
        rows = con.execute("SELECT issue_id, rater, choice, rating, comment FROM judgements").fetchall()
    assert rows == [(pair["pair_id"], "alice", "a", 4, "A answers the question")]
