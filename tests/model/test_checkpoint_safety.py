"""Hostile and broken checkpoint files get one clear line from every reader (issue 16, items 1-3).

`evil.pt` pickles `os.system` (it would run `touch PWNED` if anything unpickled it). Every
reader must refuse it with one line naming the file and `posix.system`, never PyTorch's advice
to load it with weights_only=False; a corrupt safetensors file must name the file.
"""

from __future__ import annotations

import os
import struct

import pytest
import torch

from palm_rlhf.cli.main import main
from palm_rlhf.errors import CheckpointError
from palm_rlhf.model import PaLM
from palm_rlhf.model.checkpoint import load_adapter, save_adapter
from palm_rlhf.model.reward import RewardModel
from palm_rlhf.runtime.checkpoint import CheckpointManager
from palm_rlhf.trainers.rlhf import RLHFTrainer
from tests.helpers.models import TINY, make_palm

REFUSAL = "(it asks to run code: posix.system); refusing to load it."
PYTORCH_ADVICE = ("weights_only", "add_safe_globals", "trusted source", "Weights only load failed")


class RunsShell:
    """Unpickling this calls os.system (pickled as `posix.system`)."""

    def __init__(self, marker):
        self.command = f"touch {marker}"

    def __reduce__(self):
        return (os.system, (self.command,))


def evil_state(marker, state: dict | None = None) -> dict:
    state = dict(state if state is not None else make_palm().state_dict())
    state["payload"] = RunsShell(marker)
    return state


def cli_error(capsys, *argv) -> str:
    """Run the CLI; it must fail with exit 2 and exactly one `error: ...` line on stderr."""
    assert main(list(argv)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert not any(advice in lines[0] for advice in PYTORCH_ADVICE), lines[0]
    return lines[0]


def test_pickled_code_gets_one_line_from_every_reader(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    torch.save(evil_state(marker), "evil.pt")

    line = cli_error(capsys, "convert", "evil.pt", "out")
    assert line.startswith(f"error: evil.pt: not a plain state dict {REFUSAL} Convert trusted files with"), line
    assert not (tmp_path / "out").exists()
    assert cli_error(capsys, "info", "evil.pt") == line

    for load in (lambda p: PaLM(**TINY).load(p), lambda p: RewardModel(PaLM(**TINY)).load(p)):
        with pytest.raises(CheckpointError) as e:
            load("evil.pt")
        assert str(e.value) == line.removeprefix("error: ")

    # a run whose trainer state was swapped for a pickle: `info STEP_DIR` and resuming refuse it
    mgr = CheckpointManager(tmp_path / "run")
    step = mgr.save(1, {"step": 1}, model=make_palm())
    torch.save(evil_state(marker, {"step": 1}), step / "state.pt")
    line = cli_error(capsys, "info", str(step))
    assert f"{step / 'state.pt'}: not a plain trainer state {REFUSAL}" in line
    assert f"Delete {step} to fall back to an older checkpoint" in line
    with pytest.raises(CheckpointError, match="not a plain trainer state") as e:
        CheckpointManager(tmp_path / "run").load()  # what every trainer's resume calls
    assert str(e.value) == line.removeprefix("error: ")
    assert not marker.exists()


def test_legacy_format_and_plain_pickles_are_refused_the_same_way(tmp_path):
    import pickle

    marker = tmp_path / "PWNED"
    torch.save(evil_state(marker), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "plain.pt").write_bytes(pickle.dumps({"x": RunsShell(marker)}, protocol=4))
    for name in ("legacy.pt", "plain.pt"):
        with pytest.raises(CheckpointError, match=rf"{name}: not a plain state dict \(it asks to run code: "
                                                  r"posix\.system\); refusing"):
            PaLM(**TINY).load(tmp_path / name)
    assert not marker.exists()


def _rlhf_trainer():
    torch.manual_seed(0)
    palm = PaLM(dim=32, num_tokens=64, depth=1, heads=2, dim_head=16)
    return RLHFTrainer(palm=palm, reward_model=RewardModel(palm, dropout=0.0),
                       prompt_token_ids=torch.randint(1, 64, (2, 4)))


def test_rlhf_trainer_load_uses_the_safe_reader(tmp_path):
    trainer = _rlhf_trainer()
    trainer.save(tmp_path / "ok.pt")
    saved = {k: v.clone() for k, v in trainer.actor_critic.state_dict().items()}
    with torch.no_grad():
        for p in trainer.actor_critic.parameters():
            p.add_(1.0)
    trainer.load(tmp_path / "ok.pt")  # the seed's save/load round trip still works
    assert all(torch.equal(v, saved[k]) for k, v in trainer.actor_critic.state_dict().items())

    marker = tmp_path / "PWNED"
    torch.save(evil_state(marker, trainer.actor_critic.state_dict()), tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=rf"evil\.pt: not a plain state dict \(it asks to run code"):
        trainer.load(tmp_path / "evil.pt")
    assert not marker.exists()


def _header_too_large(path):
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")  # a header length no file can hold


def test_corrupt_safetensors_names_the_file_everywhere(tmp_path, capsys):
    model = make_palm()
    model.add_finetune_params("actor", lora_r=2)
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    _header_too_large(weights)
    for argv in (["info", str(tmp_path / "m")], ["info", str(weights)]):
        line = cli_error(capsys, *argv)
        assert f"{weights}: cannot read safetensors file" in line and "header too large" in line
    for load in (lambda: PaLM.from_pretrained(tmp_path / "m"), lambda: PaLM(**TINY).load(weights)):
        with pytest.raises(CheckpointError, match="model.safetensors: cannot read safetensors file"):
            load()

    adapter = tmp_path / "actor.safetensors"
    save_adapter(model, "actor", adapter)
    adapter.write_bytes(adapter.read_bytes()[:20])  # truncated mid-header
    line = cli_error(capsys, "info", str(adapter))
    assert f"{adapter}: cannot read safetensors file" in line
    with pytest.raises(CheckpointError, match=r"actor\.safetensors: cannot read safetensors file"):
        load_adapter(make_palm(), adapter)


def test_corrupt_pt_is_one_line_without_pytorch_advice(tmp_path, capsys):
    (tmp_path / "zeros.pt").write_bytes(b"\x00\xff" * 500)  # not a pickle at all
    torch.save(make_palm().state_dict(), tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:300])  # a truncated zip
    for name in ("zeros.pt", "cut.pt"):
        line = cli_error(capsys, "info", str(tmp_path / name))
        assert f"{tmp_path / name}: cannot read (truncated or corrupt" in line
