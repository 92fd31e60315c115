"""What the one run runtime promises, checked for EVERY trainer (pretrain, finetune, reward, PPO,
GRPO, DPO): SIGINT mid-run saves a checkpoint and the resumed run ends bit-identical to the
uninterrupted one; a diverging loss names the 1-based step; setup errors are one line; final/ holds
the model, the tokenizer and run.json; GRPO/DPO learn with dropout off; uneven splits are errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from palm_rlhf.data.tokenizer import ByteTokenizer, load_tokenizer
from palm_rlhf.errors import ConfigError, DataError, TrainingError
from palm_rlhf.runtime import distributed as rdist
from palm_rlhf.runtime.checkpoint import CheckpointManager
from palm_rlhf.runtime.metrics import read_metrics
from palm_rlhf.runtime.run import RunInterrupted
from run_testing import TRAINERS, make_trainer, write_inputs

HERE = Path(__file__).resolve().parent
# wall-clock figures differ between any two runs; everything else must match exactly
_TIMING = ("time", "tokens_per_s", "seconds_generation", "seconds_learning")


def _run(trainer):
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()


def _weights(directory: Path) -> dict:
    return {f.name: load_file(f) for f in sorted(directory.glob("*.safetensors"))}


def _rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in _TIMING} for r in read_metrics(run_dir)]


@pytest.mark.parametrize("kind", TRAINERS)
def test_sigint_saves_and_the_resumed_run_equals_the_uninterrupted_one(tmp_path, kind):
    write_inputs(tmp_path)
    _run(make_trainer(kind, tmp_path, "full"))

    cut = make_trainer(kind, tmp_path, "cut")
    one_step = None

    def step_then_sigint(step):
        out = one_step(step)
        if step == 1:  # Ctrl-C during the 2nd step: it finishes, is saved, the run stops
            os.kill(os.getpid(), signal.SIGINT)
        return out

    try:
        cut.setup()
        one_step, cut.train_step = cut.train_step, step_then_sigint
        with pytest.raises(RunInterrupted, match="at step 2; .* resume with the same command"):
            cut.train()
    finally:
        cut.cleanup()
    assert CheckpointManager(tmp_path / "cut").load()["step"] == 2
    assert not (tmp_path / "cut" / "final").exists()

    resumed = make_trainer(kind, tmp_path, "cut", "resume=must")
    try:
        resumed.setup()
        assert resumed.run.step == 2
        resumed.train()
    finally:
        resumed.cleanup()
    full, again = _weights(tmp_path / "full" / "final"), _weights(tmp_path / "cut" / "final")
    assert full.keys() == again.keys() and "model.safetensors" in full
    for name in full:
        assert full[name].keys() == again[name].keys()
        assert all(torch.equal(full[name][k], again[name][k]) for k in full[name]), name
    assert _rows(tmp_path / "full") == _rows(tmp_path / "cut")  # every logged number, bit for bit
    assert [r["step"] for r in read_metrics(tmp_path / "cut") if "step" in r][-1] == 4
    # final/ is usable on its own: the tokenizer and a record of the run travel with the weights
    final = tmp_path / "cut" / "final"
    assert load_tokenizer(final) == ByteTokenizer()
    record = json.loads((final / "run.json").read_text())
    assert record["algorithm"] == kind.removesuffix("-full") and record["steps"] == 4
    assert (tmp_path / "cut" / "config.yaml").is_file()
    ckpt = CheckpointManager(tmp_path / "cut").latest()
    assert ckpt.name == "step_00000004" and load_tokenizer(ckpt) == ByteTokenizer()


@pytest.mark.parametrize("kind", TRAINERS)
def test_a_diverging_loss_names_the_step_that_diverged(tmp_path, kind):
    write_inputs(tmp_path)
    trainer = make_trainer(kind, tmp_path, "nan")
    try:
        trainer.setup()
        run, step = trainer.run, trainer.run.optimizer_step

        def nan_in_the_third_step(loss_fn, batches):
            def poisoned(batch):
                out = loss_fn(batch)
                loss, weight = out if isinstance(out, tuple) else (out, 1.0)
                return (loss * float("nan") if run.step == 2 else loss), weight
            return step(poisoned, batches)

        run.optimizer_step = nan_in_the_third_step
        with pytest.raises(TrainingError, match=r"^step 3: loss is nan"):
            trainer.train()
    finally:
        trainer.cleanup()


@pytest.mark.parametrize("kind", ["finetune", "reward", "ppo", "dpo"])
def test_an_out_dir_that_cannot_be_created_is_a_config_error_before_any_work(tmp_path, kind):
    write_inputs(tmp_path)
    (tmp_path / "afile").write_text("x")
    trainer = make_trainer(kind, tmp_path, "afile/x")
    with pytest.raises(ConfigError, match="afile' is a file; choose another out_dir"):
        trainer.setup()
    trainer.cleanup()  # closes only what was opened: nothing here


def test_a_dpo_setup_error_stays_the_error_and_cleanup_is_quiet(tmp_path):
    write_inputs(tmp_path)
    trainer = make_trainer("dpo", tmp_path, "dpo", f"data={tmp_path / 'missing.jsonl'}")
    with pytest.raises(DataError, match="missing.jsonl"):
        trainer.setup()
    trainer.cleanup()
    trainer.cleanup()


@pytest.mark.parametrize("kind", ["reward", "ppo", "dpo"])
def test_resume_must_without_a_checkpoint_is_an_error(tmp_path, kind):
    write_inputs(tmp_path)
    trainer = make_trainer(kind, tmp_path, "fresh", "resume=must")
    try:
        with pytest.raises(Exception, match="resume=must: no checkpoint"):
            trainer.setup()
    finally:
        trainer.cleanup()


@pytest.mark.parametrize("args, message", [
    (["ppo", "out_dir={tmp}/afile/x"], "afile' is a file; choose another out_dir"),
    (["dpo", "data={tmp}/missing.jsonl"], "missing.jsonl"),
    (["grpo", "prompts_per_step=3", "model={tmp}/nowhere"], "nowhere"),
    (["finetune", "out_dir={tmp}/afile/sft"], "afile' is a file"),
])
def test_setup_errors_are_one_line_from_the_cli(tmp_path, args, message):
    """As a user sees them: exit code 2, one `error:` line, no traceback, no `internal error`."""
    from run_testing import overrides

    write_inputs(tmp_path)
    (tmp_path / "afile").write_text("x")
    kind = args[0]
    given = [a.format(tmp=tmp_path) for a in args[1:]]
    keys = {a.split("=", 1)[0] for a in given}
    base = [o for o in overrides(kind, tmp_path, "cli") if o.split("=", 1)[0] not in keys]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "palm_rlhf", kind, *base, *given], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "internal error"))]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("error:") and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_grpo_learns_with_dropout_off(tmp_path):
    """A base with dropout 0.1 and unchanged weights: the one minibatch of step 1 sees the policy that
    sampled it, so the ratio is exactly 1 (approx_kl = clip_frac = 0), as in PPO."""
    write_inputs(tmp_path, dropout=0.1)
    history = _run(make_trainer("grpo", tmp_path, "grpo", "batch_size=4", "epochs=1", max_steps=1))
    assert history[0]["approx_kl"] == 0.0 and history[0]["clip_frac"] == 0.0


def test_dpo_learns_with_dropout_off(tmp_path):
    """Policy == reference at step 1 (a fresh actor scope): every implicit reward is 0, so the DPO loss
    is -log sigmoid(0) = ln 2 exactly, which dropout 0.1 in the policy's forward would break."""
    write_inputs(tmp_path, dropout=0.1)
    history = _run(make_trainer("dpo", tmp_path, "dpo", max_steps=1))
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("kind, key, message", [
    ("ppo", "prompts_per_step=3", "prompts_per_step=3 does not divide over 2 processes; use 2 or 4"),
    ("grpo", "prompts_per_step=3", "prompts_per_step=3 does not divide over 2 processes; use 2 or 4"),
    ("ppo", "batch_size=5", "batch_size=5 does not divide over 2 processes; use 4 or 6"),
    ("ppo", "micro_batch_size=2", "batch_size=2 is not a multiple of micro_batch_size=2 x 2 process"),
    ("finetune", "micro_batch_size=2", "batch_size=2 is not a multiple of micro_batch_size=2 x 2 process"),
    ("dpo", "batch_size=3", "batch_size=3 does not divide over 2 processes; use 2 or 4"),
])
def test_batches_that_do_not_split_over_the_processes_are_config_errors(tmp_path, monkeypatch, kind, key, message):
    """Checked right after joining the process group, before any model is loaded (here a 2-process
    environment is faked: the check reads only the world size)."""
    write_inputs(tmp_path)
    monkeypatch.setattr(rdist, "init_distributed", lambda device="auto": rdist.DistEnv(world_size=2))
    trainer = make_trainer(kind, tmp_path, "uneven", key)
    with pytest.raises(ConfigError, match=message):
        trainer.setup()
    trainer.cleanup()


def test_dpo_writes_its_last_checkpoint_once(tmp_path, monkeypatch):
    """max_steps a multiple of save_every: the step-4 checkpoint is written once, not twice."""
    write_inputs(tmp_path)
    saved = []
    original = CheckpointManager.save
    monkeypatch.setattr(CheckpointManager, "save", lambda self, step, *a, **k: saved.append(step) or
                        original(self, step, *a, **k))
    _run(make_trainer("dpo", tmp_path, "dpo", "save_every=2"))
    assert saved == [2, 4]


@pytest.mark.parametrize("kind", ["finetune", "reward", "ppo", "grpo", "dpo"])
def test_a_tokenizer_the_model_cannot_embed_is_a_setup_error(tmp_path, kind):
    """A 128-token model saved with the 256-id byte tokenizer: refused before any training."""
    write_inputs(tmp_path)
    from palm_rlhf.model import PaLM

    small = tmp_path / "small"
    PaLM(num_tokens=128, dim=16, depth=1, heads=2, dim_head=8).save_pretrained(small)
    ByteTokenizer().save(small)
    trainer = make_trainer(kind, tmp_path, "small", f"model={small}")
    try:
        with pytest.raises(ConfigError, match="the tokenizer has 256 ids but the model embeds only 128"):
            trainer.setup()
    finally:
        trainer.cleanup()
    assert not (tmp_path / "small" / "checkpoints").exists() and not (tmp_path / "small" / "metrics.jsonl").exists()


def test_log_lines_do_not_glue_onto_the_progress_bar(tmp_path, capsys):
    """With the bar on, a log line during training (here the reward trainer's validation) is written
    through tqdm: the bar is cleared first, so the line starts clean instead of after `it/s]`."""
    import logging

    write_inputs(tmp_path)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("LOG %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        _run(make_trainer("reward", tmp_path, "bar", "progress=true", "eval.fraction=0.25", "eval.every=1",
                          max_steps=3))
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if "validation:" in line]
    assert len(lines) >= 3 and "reward:" in err, err
    for line in lines:
        assert line.split("\r")[-1].startswith("LOG step "), repr(line)


@pytest.mark.parametrize("kind", ["pretrain", "dpo"])
def test_ctrl_c_on_the_cli_saves_and_exits_130(tmp_path, kind):
    """The command a user runs: SIGINT once training has begun -> checkpoint, the resume hint, exit 130."""
    import time

    from run_testing import overrides

    write_inputs(tmp_path)
    args = [o for o in overrides(kind, tmp_path, "cli", max_steps=100_000)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "palm_rlhf", kind, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 240
    while not read_metrics(tmp_path / "cli") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    assert "resume with the same command" in err and "Traceback" not in err, err[-2000:]
    step = CheckpointManager(tmp_path / "cli").load()["step"]
    assert step >= 1 and max(r["step"] for r in read_metrics(tmp_path / "cli")) == step
