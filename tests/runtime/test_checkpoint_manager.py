"""CheckpointManager: atomic step directories, keep-last-K, `latest` never broken, RNG round trip."""

import random

import numpy as np
import pytest
import torch

from palm_rlhf.data.tokenizer import ByteTokenizer, load_tokenizer
from palm_rlhf.errors import CheckpointError
from palm_rlhf.model import PaLM
from palm_rlhf.runtime.checkpoint import CheckpointManager, rng_state, set_rng_state
from tests.helpers.memory import peak_mib_added


def test_save_load_keep_last(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    assert mgr.latest() is None
    model = PaLM(dim=16, num_tokens=256, depth=1, heads=2, dim_head=8)
    for step in (1, 2, 3):
        mgr.save(step, {"step": step, "position": [step, 0]}, model=model, tokenizer=ByteTokenizer())
    assert [p.name for p in mgr.list()] == ["step_00000002", "step_00000003"]
    state = mgr.load()
    assert state["step"] == 3 and state["position"] == [3, 0]
    loaded = PaLM.from_pretrained(mgr.latest())  # a step directory is a save_pretrained directory
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert load_tokenizer(mgr.latest()) == ByteTokenizer()


def test_optimizer_state_streams_to_disk_without_a_copy_in_memory(tmp_path):
    """AdamW state of 2 x 32 MiB goes into state.pt exactly, and the save adds under 8 MiB to the peak
    resident memory: torch.save writes into the checkpoint's temporary file as it goes (saving into a
    BytesIO first held a whole serialised copy: +64 MiB, what a full-finetune reward run's last save
    added to its peak)."""
    params = [torch.nn.Parameter(torch.randn(1024, 1024)) for _ in range(8)]  # 32 MiB
    optimizer = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    state = {"step": 1, "optimizer": optimizer.state_dict()}
    mgr = CheckpointManager(tmp_path)
    added = peak_mib_added(lambda: mgr.save(1, state))
    assert added < 8, f"saving 64 MiB of optimizer state added {added:.0f} MiB to the peak RSS"
    loaded = mgr.load()["optimizer"]["state"]
    for i, saved in optimizer.state_dict()["state"].items():
        assert torch.equal(loaded[i]["exp_avg"], saved["exp_avg"])
        assert torch.equal(loaded[i]["exp_avg_sq"], saved["exp_avg_sq"])


def test_crash_mid_save_keeps_latest(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save(1, {"step": 1})

    class Boom:
        def save_pretrained(self, d):
            (d / "partial").write_bytes(b"x")
            raise OSError("disk full")

    with pytest.raises(CheckpointError, match="disk full"):
        mgr.save(2, {"step": 2}, model=Boom())
    assert mgr.latest().name == "step_00000001" and mgr.load()["step"] == 1
    assert sorted(p.name for p in mgr.dir.iterdir()) == ["latest", "step_00000001"]  # no temporaries left


def test_dangling_latest_falls_back_and_orphans_are_removed(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"step": 1})
    mgr.save(2, {"step": 2})
    (mgr.dir / ".tmp-step_00000003-99").mkdir()  # a crash after mkdir of the temp directory
    (mgr.dir / "latest").write_text("step_00000009")
    mgr = CheckpointManager(tmp_path)
    assert not list(mgr.dir.glob(".tmp-*"))
    assert mgr.latest().name == "step_00000002"
    (mgr.dir / "step_00000002" / "state.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="cannot read"):
        mgr.load(mgr.dir / "step_00000002")


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    CheckpointManager(tmp_path).save(1, {"rng": rng_state()})
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    set_rng_state(CheckpointManager(tmp_path).load()["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_non_main_process_writes_nothing(tmp_path):
    assert CheckpointManager(tmp_path, is_main=False).save(1, {"step": 1}) is None
    assert not (tmp_path / "checkpoints").exists()
