"""torchrun on CPU (gloo): 2 processes == 1 process with the same global batch, and a 2-process
checkpoint resumes in 1 process."""

import os
import shutil
import subprocess
import sys

import pytest

from palm_rlhf.runtime.metrics import read_metrics

from pretrain_testing import write_corpus

pytestmark = pytest.mark.slow

ARGS = ["model.dim=32", "model.depth=1", "model.heads=2", "model.dim_head=16", "seq_len=16", "max_steps=4",
        "log_every=1", "eval.every=2", "eval.samples=4", "save_every=2", "progress=false", "optim.lr=1e-2",
        "optim.warmup=1", "device=cpu", "threads=1", "eval.fraction=0.1"]


def _pretrain(tmp_path, nproc, out, *extra):
    cmd = [sys.executable, "-m", "palm_rlhf", "pretrain", *ARGS, f"out_dir={tmp_path / out}", *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "palm_rlhf", "pretrain", *cmd[4:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _curve(run_dir, key="train/loss"):
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


def test_two_processes_equal_one_and_resume_in_one(tmp_path):
    corpus = write_corpus(tmp_path)
    # the 1-process run prepares the corpus; the others reuse the prepared directory
    _pretrain(tmp_path, 1, "one", f"data.sources=[{corpus}]", "batch_size=4")
    data = tmp_path / "one" / "data"
    _pretrain(tmp_path, 2, "two", f"data.sources=[{data}]", "batch_size=4")
    one, two = _curve(tmp_path / "one"), _curve(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5)
    val_one, val_two = _curve(tmp_path / "one", "val/loss"), _curve(tmp_path / "two", "val/loss")
    assert val_two == pytest.approx(val_one, abs=1e-5)
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()

    # a 2-process checkpoint (step 2) continues in one process with the same global batch
    ckpts = tmp_path / "two" / "checkpoints"
    shutil.rmtree(ckpts / "step_00000004")
    (ckpts / "latest").write_text("step_00000002")
    _pretrain(tmp_path, 1, "two", f"data.sources=[{data}]", "batch_size=4")
    resumed = _curve(tmp_path / "two")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(one[step], abs=1e-5)


def _rewind_to_step_2(run_dir):
    ckpts = run_dir / "checkpoints"
    shutil.rmtree(ckpts / "step_00000004")
    (ckpts / "latest").write_text("step_00000002")


def test_fsdp_equals_one_process_and_checkpoints_move_between_them(tmp_path):
    corpus = write_corpus(tmp_path)
    _pretrain(tmp_path, 1, "one", f"data.sources=[{corpus}]", "batch_size=4", "model.depth=2")
    data = tmp_path / "one" / "data"
    _pretrain(tmp_path, 2, "fsdp", f"data.sources=[{data}]", "batch_size=4", "model.depth=2", "distributed=fsdp")
    one, sharded = _curve(tmp_path / "one"), _curve(tmp_path / "fsdp")
    assert sorted(sharded) == [1, 2, 3, 4]
    assert [sharded[s] for s in one] == pytest.approx([one[s] for s in one], abs=1e-5)
    # an FSDP checkpoint resumes in one process, and a one-process checkpoint under FSDP
    _rewind_to_step_2(tmp_path / "fsdp")
    _pretrain(tmp_path, 1, "fsdp", f"data.sources=[{data}]", "batch_size=4", "model.depth=2")
    _rewind_to_step_2(tmp_path / "one")
    _pretrain(tmp_path, 2, "one", f"data.sources=[{data}]", "batch_size=4", "model.depth=2", "distributed=fsdp")
    for run in ("fsdp", "one"):
        resumed = _curve(tmp_path / run)
        assert [resumed[s] for s in (3, 4)] == pytest.approx([one[s] for s in (3, 4)], abs=1e-5)
