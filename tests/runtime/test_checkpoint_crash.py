"""SIGKILL at exact points inside a save or a prune leaves no debris after the next start (issue 16, 4-5).

Each scenario runs in a child process that kills itself (SIGKILL: no `finally`, no clean-up)
at one exact call: between writing `latest`'s temporary file and renaming it, in the middle of
streaming `state.pt` into its temporary file, and in the middle of deleting a pruned step directory. The parent then starts a new CheckpointManager, as a
resumed run does, and checks what is on disk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from palm_rlhf.model import PaLM
from palm_rlhf.files import is_temporary, remove_temporaries
from palm_rlhf.runtime.checkpoint import CheckpointManager

CHILD = """
import os, shutil, signal, sys
from pathlib import Path
import palm_rlhf.files as model_ckpt
import palm_rlhf.runtime.checkpoint as run_ckpt
from palm_rlhf.runtime.checkpoint import CheckpointManager

run, keep_last, kill_at = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
mgr = CheckpointManager(run, keep_last=keep_last)
mgr.save(1, {"step": 1}); mgr.save(2, {"step": 2})
real_replace, real_rmtree = os.replace, shutil.rmtree

def replace(src, dst):
    if kill_at == "latest" and Path(dst).name == "latest":
        os.kill(os.getpid(), signal.SIGKILL)   # latest's temporary file is written, not yet renamed
    return real_replace(src, dst)

def rmtree(path, *args, **kwargs):
    if kill_at == "prune" and "step_00000001" in Path(path).name:
        (Path(path) / "state.pt").unlink()     # half deleted ...
        os.kill(os.getpid(), signal.SIGKILL)   # ... then killed
    return real_rmtree(path, *args, **kwargs)

real_save = model_ckpt.torch.save

def save(obj, f, *args, **kwargs):
    if kill_at == "state" and obj.get("step") == 3:
        f.write(b"partial"); f.flush()       # state.pt streams straight into its temporary file ...
        os.kill(os.getpid(), signal.SIGKILL) # ... and the process dies half way
    return real_save(obj, f, *args, **kwargs)

model_ckpt.os.replace = replace
model_ckpt.torch.save = save
run_ckpt.shutil.rmtree = rmtree
mgr.save(3, {"step": 3})
print("not killed")
"""


def killed_child(run: Path, keep_last: int, kill_at: str) -> None:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD), str(run), str(keep_last), kill_at],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def test_kill_before_latest_is_renamed_leaves_a_temporary_that_start_up_removes(tmp_path):
    killed_child(tmp_path, 5, "latest")
    left = [n for n in names(tmp_path / "checkpoints") if n.startswith(".latest.")]
    assert len(left) == 1 and left[0].endswith(".tmp")  # the debris the issue found
    assert CheckpointManager(tmp_path, is_main=False).latest().name == "step_00000002"  # the old pointer
    assert left[0] in names(tmp_path / "checkpoints")  # a reader (e.g. `info` on a live run) touches nothing
    mgr = CheckpointManager(tmp_path, keep_last=5)  # the writer's start-up
    assert names(mgr.dir) == {"latest", "step_00000001", "step_00000002", "step_00000003"}
    assert mgr.load()["step"] == 2  # `latest` still names a complete step


def test_kill_while_state_streams_to_disk_keeps_the_previous_checkpoint(tmp_path):
    """state.pt is written by torch.save straight into a file (no copy in memory), inside the step's
    temporary directory: a kill half way leaves that directory, which start-up removes."""
    killed_child(tmp_path, 5, "state")
    checkpoints = tmp_path / "checkpoints"
    assert [n for n in names(checkpoints) if n.startswith(".step_00000003.")], names(checkpoints)
    assert CheckpointManager(tmp_path, is_main=False).latest().name == "step_00000002"
    mgr = CheckpointManager(tmp_path, keep_last=5)
    assert names(mgr.dir) == {"latest", "step_00000001", "step_00000002"}
    assert mgr.load()["step"] == 2


def test_kill_mid_prune_keeps_keep_last_after_restart(tmp_path):
    killed_child(tmp_path, 2, "prune")
    mgr = CheckpointManager(tmp_path, keep_last=2)
    assert names(mgr.dir) == {"latest", "step_00000002", "step_00000003"}
    assert [p.name for p in mgr.list()] == ["step_00000002", "step_00000003"] and mgr.load()["step"] == 3
    mgr.save(4, {"step": 4})
    assert names(mgr.dir) == {"latest", "step_00000003", "step_00000004"}


def test_half_deleted_step_of_an_older_version_is_removed_at_start_up(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        mgr.save(step, {"step": step}, model=PaLM(dim=16, num_tokens=256, depth=1, heads=2, dim_head=8))
    legacy = mgr.dir / "step_00000001"  # what in-place rmtree left when killed: no state.pt
    legacy.mkdir()
    (legacy / "model.safetensors").write_bytes(b"x")
    newer_incomplete = mgr.dir / "step_00000009"  # never published by us: not ours to judge, kept
    newer_incomplete.mkdir()
    CheckpointManager(tmp_path, keep_last=2)
    assert names(mgr.dir) == {"latest", "step_00000002", "step_00000003", "step_00000009"}


def test_temporary_names_and_targeted_clean_up(tmp_path):
    from palm_rlhf.files import atomic_write_bytes

    for name in (".latest.ab12cd34.tmp", ".latest.json.ab12cd34.tmp", ".tmp-step_00000001-12"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / ".hidden").write_bytes(b"")  # not a name this library makes
    assert [is_temporary(n) for n in sorted(names(tmp_path))] == [False, True, True, True]
    atomic_write_bytes(tmp_path / "latest", b"step_00000001")  # removes only `latest`'s own leftovers
    assert names(tmp_path) == {"latest", ".latest.json.ab12cd34.tmp", ".tmp-step_00000001-12", ".hidden"}
    assert sorted(p.name for p in remove_temporaries(tmp_path)) == [".latest.json.ab12cd34.tmp",
                                                                    ".tmp-step_00000001-12"]
    assert names(tmp_path) == {"latest", ".hidden"}


@pytest.mark.parametrize("where", ["final", "prepared data"])
def test_next_write_removes_temporaries_of_a_killed_save_pretrained_or_prepare(tmp_path, where):
    from palm_rlhf.data.corpus import prepare_corpus
    from palm_rlhf.data.tokenizer import ByteTokenizer

    out = tmp_path / "out"
    out.mkdir()
    debris = [".model.safetensors.k1ll3d00.tmp", ".config.json.k1ll3d00.tmp"] if where == "final" else \
        [".train.bin.k1ll3d00.tmp", ".manifest.json.k1ll3d00.tmp", ".tokenizer_config.json.k1ll3d00.tmp"]
    for name in debris:
        (out / name).write_bytes(b"partial")
    if where == "final":
        PaLM(dim=16, num_tokens=256, depth=1, heads=2, dim_head=8).save_pretrained(out)
    else:
        (tmp_path / "a.txt").write_text("hello\n" * 50)
        prepare_corpus([tmp_path / "a.txt"], out, ByteTokenizer(), val_fraction=0.1)
    assert not [n for n in names(out) if is_temporary(n)], names(out)
    assert os.listdir(out)
