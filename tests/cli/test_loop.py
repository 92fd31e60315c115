"""docs/loop.md, run as written: every command of its ```bash blocks, in order, in one empty directory,
as subprocesses of the installed `palm-rlhf` with no PYTHONPATH.

Only sizes change: each command gets test-sized overrides appended (a later `key=value` or flag wins),
so the loop closes in seconds with a BPE tokenizer. `feedback serve` runs in the background on a free
port; the test judges pairs through the app's JSON API (what the page's script-rater note describes)
and stops it with Ctrl-C, as a rater would.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "feedback"))
from feedback_testing import launch, wait_healthy  # noqa: E402  (the feedback tests' process helpers)
PAGE = ROOT / "docs" / "loop.md"
BIN = Path(sys.executable).parent          # the venv whose python runs the tests
EXE = BIN / "palm-rlhf"
RUNS = ("base", "sft", "rm", "ppo", "grpo", "dpo")
PROMPT = "def load(path):\n"

_TRAIN = "--no-progress report_to=jsonl save_every=0"
TINY = {  # appended to each command of the page (longest command names first)
    "tokenizer train": "--vocab-size 320",
    "reward train": f"max_steps=2 batch_size=2 max_len=48 eval.every=2 {_TRAIN}",
    "reward score": "--max-len 48",
    "pretrain": f"max_steps=3 model.dim=32 model.depth=1 model.heads=2 model.dim_head=16 seq_len=32 batch_size=2 "
                f"eval.every=0 eval.samples=2 sample_every=0 {_TRAIN}",
    "finetune": f"max_steps=2 batch_size=2 seq_len=48 eval.every=0 sample_every=0 {_TRAIN}",
    "ppo": f"max_steps=2 prompts_per_step=2 rollout_batch_size=2 batch_size=2 max_new_tokens=6 "
           f"sample_every=0 {_TRAIN}",
    "grpo": f"max_steps=2 prompts_per_step=2 group_size=2 batch_size=4 max_new_tokens=6 sample_every=0 {_TRAIN}",
    "dpo": f"max_steps=2 batch_size=2 max_len=48 eval.every=2 {_TRAIN}",
    "generate": "--max-new-tokens 6",
    "feedback serve": "--port 0 --max-new-tokens 6 --queue-size 2",
}


def page_commands(text: str) -> list[str]:
    """The page's bash blocks as shell snippets: each `palm-rlhf ...` line alone, other lines (heredocs,
    cp) grouped."""
    snippets: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        chunk: list[str] = []
        heredoc_end = None
        for line in block.splitlines():
            if heredoc_end is None and line.startswith("palm-rlhf "):
                if chunk:
                    snippets.append("\n".join(chunk))
                    chunk = []
                snippets.append(line)
                continue
            chunk.append(line)
            if heredoc_end is None and (m := re.search(r"<<'?(\w+)'?", line)):
                heredoc_end = m.group(1)
            elif line == heredoc_end:
                heredoc_end = None
        if chunk:
            snippets.append("\n".join(chunk))
    return snippets


def tiny(command: str) -> str:
    if not command.startswith("palm-rlhf "):
        return command
    words = command.split()
    for name, extra in TINY.items():
        if " ".join(words[1:1 + len(name.split())]) == name:
            return f"{command} {extra}"
    return command


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"  # `palm-rlhf` and `python` of this install
    e["OMP_NUM_THREADS"] = "1"  # a shared CPU: one thread per process
    e["PYTHONUNBUFFERED"] = "1"
    return e


def run(snippet: str, cwd: Path) -> str:
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", snippet], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"`{snippet}` exited {done.returncode}:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout


def _api(url: str, token: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(url.rstrip("/") + path, headers={"Authorization": f"Bearer {token}"},
                                     data=None if body is None else json.dumps(body).encode())
    if body is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def serve_and_judge(snippet: str, cwd: Path, judgements: int) -> dict:
    """Start `feedback serve`, judge pairs like a rater (prefer the completion that ends its line),
    read the stats, stop it with Ctrl-C. Returns /api/stats."""
    token = (cwd / "raters.txt").read_text().split()[1]
    proc, lines = launch(["bash", "-c", f"exec {snippet}"], "feedback app on http", timeout=180, cwd=cwd, env=env())
    try:
        url = re.search(r"(http://\S+?)/? ", next(l for l in lines if "feedback app on" in l)).group(1)
        wait_healthy(url, proc, lines)
        for _ in range(judgements):
            pair = _api(url, token, "/api/next?wait=10")["pair"]
            assert pair is not None, f"no pair in time:\n{''.join(lines)}"
            a, b = pair["completion_a"], pair["completion_b"]
            choice = "b" if (b.count("\n"), -len(b)) > (a.count("\n"), -len(a)) else "a"  # more lines, then shorter
            _api(url, token, "/api/judge", {"pair_id": pair["pair_id"], "choice": choice, "next": False})
        return _api(url, token, "/api/stats")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_the_page_runs_as_written(tmp_path):
    assert EXE.is_file(), f"{EXE} is missing: install the package (./setup.sh) before running this test"
    pytest.importorskip("tokenizers")
    pytest.importorskip("fastapi")
    work = tmp_path / "loop"
    work.mkdir()
    outputs: dict[str, str] = {}
    stats = []
    for snippet in page_commands(PAGE.read_text()):
        command = tiny(snippet)
        if snippet.startswith("palm-rlhf feedback serve"):
            stats.append(serve_and_judge(command, work, judgements=12 if not stats else 2))
        else:
            outputs[snippet] = run(command, work)
    runs = work / "runs"

    # every run ends in final/ carrying the base's tokenizer byte for byte, files 0644
    for name in RUNS:
        final = runs / name / "final"
        for file in ("tokenizer_config.json", "tokenizer.json"):
            assert (final / file).read_bytes() == (runs / "tok" / file).read_bytes(), f"{name}: {file} differs"
        for file in final.iterdir():
            assert file.stat().st_mode & 0o777 == 0o644, f"{file} is {oct(file.stat().st_mode & 0o777)}"
    for name in ("ppo", "grpo", "dpo"):
        record = json.loads((runs / name / "final" / "run.json").read_text())
        assert record["algorithm"] == name and record["steps"] == 2
        assert (runs / name / "final" / "adapter.safetensors").is_file()
    assert (runs / "sft" / "final" / "adapter.safetensors").is_file()

    # generate RUN_DIR works for sft, ppo, grpo, dpo and prints the prompt's continuation
    generated = {cmd.split()[2]: out for cmd, out in outputs.items() if cmd.startswith("palm-rlhf generate")}
    assert set(generated) == {"runs/sft", "runs/ppo", "runs/grpo", "runs/dpo"}
    for out in generated.values():
        assert out.startswith(PROMPT)
    # the SFT model + PPO's adapter is the PPO policy: same seed, same text (that the adapter changes the
    # text is tests/generation/test_cli_generate.py's: two PPO steps at this size barely move it)
    assert outputs[next(c for c in outputs if "--adapter" in c)] == generated["runs/ppo"]

    # info RUN_DIR works for every run
    info = outputs[next(c for c in outputs if c.startswith("palm-rlhf info"))]
    for name in RUNS:
        assert f"runs/{name}: " in info and f"(resolved to runs/{name}/final)" in info
    assert info.count("BPETokenizer(vocab_size=") == len(RUNS)

    # the app labels the two models by their runs
    first, compare = stats
    assert first["total"] == 12
    labels = {c["checkpoint"].split("@")[0] for c in compare["checkpoints"]}
    assert labels == {"ppo", "sft"}, compare
    assert (work / "prefs.jsonl").read_text().count("\n") >= 8
