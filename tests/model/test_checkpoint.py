"""Checkpoints that cannot run code, fail loudly and are written atomically."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import palm_rlhf.files as ckpt
from palm_rlhf.errors import CheckpointError
from palm_rlhf.model import PaLM
from tests.helpers.models import TINY, make_palm

X = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(0))


def with_scope(model, scope="sft", r=4):
    model.add_finetune_params(scope, lora_r=r)
    with torch.no_grad():
        for p in model.finetune_parameters(scope):
            p.normal_(std=0.05)
    return model


def test_save_pretrained_round_trip(tmp_path):
    model = with_scope(make_palm(qk_rmsnorm=True))
    with_scope(model, "critic", r=2)
    model.save_pretrained(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["finetune_scopes"] == {"sft": 4, "critic": 2} and config["qk_rmsnorm"] is True

    loaded = PaLM.from_pretrained(tmp_path / "run").eval()
    assert loaded.to_logits.weight is loaded.token_emb.weight  # still tied after loading
    for scope in (None, "sft", "critic"):
        assert torch.equal(loaded(X, finetune_scope=scope), model(X, finetune_scope=scope))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_load_state_dict_files(tmp_path, suffix):
    model = make_palm()
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "to_logits.weight"}, str(path))
    fresh = PaLM(**TINY).eval()
    assert fresh.load(path) is fresh
    assert torch.equal(fresh(X), model(X))


class RunsCode:
    """A pickle that would create a file when unpickled by plain torch.load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    state = make_palm().state_dict()
    state["payload"] = RunsCode(marker)
    torch.save(state, path)
    with pytest.raises(CheckpointError,
                       match=r"evil\.pt: not a plain state dict \(it asks to run code: io\.open\); refusing"):
        PaLM(**TINY).load(path)
    assert not marker.exists()


def test_non_tensor_values_are_refused(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"token_emb.weight": torch.zeros(64, 32), "step": 3}, path)
    with pytest.raises(CheckpointError, match=r"mixed\.pt: expected a dict of tensors"):
        PaLM(**TINY).load(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_and_corrupt_files(tmp_path, suffix):
    model = make_palm()
    good = tmp_path / f"good{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), good)
    else:
        model.save_pretrained(tmp_path / "d")
        good = tmp_path / "d" / "model.safetensors"
    data = good.read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(data[: len(data) // 2])
    corrupt = tmp_path / f"corrupt{suffix}"
    corrupt.write_bytes(b"\x00\xff" * 500)
    for bad in (truncated, corrupt):
        with pytest.raises(CheckpointError, match=bad.name):
            PaLM(**TINY).load(bad)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        PaLM(**TINY).load(tmp_path / f"absent{suffix}")


def test_mismatched_keys_are_named(tmp_path):
    state = make_palm().state_dict()
    state.pop("layers.1.fn.attn_out.weight")
    state["layers.7.fn.extra"] = torch.zeros(3)
    state["norm.gamma"] = torch.ones(48)
    path = tmp_path / "mismatch.safetensors"
    save_file({k: v.contiguous() for k, v in state.items() if k != "to_logits.weight"}, str(path))
    with pytest.raises(CheckpointError) as info:
        PaLM(**TINY).load(path)
    msg = str(info.value)
    assert "mismatch.safetensors" in msg
    assert "missing keys: layers.1.fn.attn_out.weight" in msg
    assert "unexpected keys: layers.7.fn.extra" in msg
    assert "norm.gamma: file (48,) vs model (32,)" in msg


def test_lora_keys_hint(tmp_path):
    model = with_scope(make_palm())
    model.save_pretrained(tmp_path / "d")
    with pytest.raises(CheckpointError, match="add them with add_finetune_params"):
        PaLM(**TINY).load(tmp_path / "d" / "model.safetensors")


def test_missing_or_broken_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        PaLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        PaLM.from_pretrained(tmp_path)


def test_writes_are_atomic(tmp_path, monkeypatch):
    """A crash in the middle of a write leaves the previous checkpoint intact and no temp files."""
    old = make_palm(seed=0)
    old.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash_midway(f, tensors, metadata=None):
        f.write(b"partial")  # half a file on disk, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "write_safetensors", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        make_palm(seed=1).save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert torch.equal(PaLM.from_pretrained(tmp_path).eval()(X), old(X))

    monkeypatch.undo()
    real_replace = ckpt.os.replace
    calls = []

    def spy(src, dst):
        calls.append((str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", spy)
    make_palm(seed=1).save_pretrained(tmp_path)
    assert [dst.rsplit("/", 1)[-1] for _, dst in calls] == ["model.safetensors", "config.json"]
    assert all(src.endswith(".tmp") for src, _ in calls)  # written elsewhere, then renamed into place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_safetensors_are_written_byte_for_byte_as_safetensors_writes_them(tmp_path):
    """Every dtype safetensors knows, a 0-d and an empty tensor, with and without metadata: the
    streamed writer's file equals `safetensors.torch.save_file`'s byte for byte."""
    dtypes = [torch.bool, torch.uint8, torch.int8, torch.float8_e5m2, torch.float8_e4m3fn, torch.int16,
              torch.uint16, torch.float16, torch.bfloat16, torch.int32, torch.uint32, torch.float32,
              torch.float64, torch.int64, torch.uint64]
    g = torch.Generator().manual_seed(0)
    tensors = {"empty": torch.zeros(0, 4)}
    for i, dtype in enumerate(dtypes):
        x = torch.randn(3, 5, generator=g) * 10
        tensors[f"t{i}.matrix"] = x.to(dtype)
        tensors[f"t{i}.scalar"] = x[0, 0].clone().to(dtype)
    for metadata in (None, {}, {"format": "pt"}):
        save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata=metadata)
        ckpt.atomic_save_tensors(tensors, tmp_path / "ours.safetensors", metadata=metadata)
        assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


STREAM_CHILD = """
import sys, torch
from pathlib import Path
from palm_rlhf.files import atomic_save_tensors
from tests.helpers.memory import peak_mib_added
tensors = {f"w{i}": torch.randn(1024, 2048, generator=torch.Generator().manual_seed(i)).t() for i in range(16)}
print(peak_mib_added(lambda: atomic_save_tensors(tensors, Path(sys.argv[1]))))
"""


def test_safetensors_stream_one_tensor_at_a_time(tmp_path):
    """16 non-contiguous 8 MiB tensors (as GPU tensors, each needs its own host copy to be written):
    the save adds well under half of their 128 MiB to a fresh process's peak resident memory (all at
    once, as `save_file` needs them, added 128+), and the file reads back exactly."""
    out = subprocess.run([sys.executable, "-c", STREAM_CHILD, str(tmp_path / "w.safetensors")], capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    added = float(out.stdout.split()[-1])
    assert added < 64, f"saving 16 x 8 MiB added {added:.0f} MiB to the peak RSS"
    loaded = ckpt.load_state_dict_file(tmp_path / "w.safetensors")
    for i in range(16):
        expected = torch.randn(1024, 2048, generator=torch.Generator().manual_seed(i)).t()
        assert torch.equal(loaded[f"w{i}"], expected)
