"""`palm-rlhf info` describes every kind of checkpoint, with parameter counts that match the model."""

import json

import torch

from palm_rlhf import PaLM
from palm_rlhf.cli.main import main
from palm_rlhf.model.checkpoint import save_adapter


def _info(capsys, *args):
    assert main(["info", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _model():
    torch.manual_seed(0)
    return PaLM(dim=32, num_tokens=256, depth=2, heads=2, dim_head=16, finetune_scopes=("actor",))


def test_save_pretrained_dir(tmp_path, capsys):
    model = _model()
    model.save_pretrained(tmp_path / "m")
    info = _info(capsys, str(tmp_path / "m"))
    assert info["kind"] == "PaLM"
    assert info["parameters"] == model.num_parameters()
    assert info["lora_parameters"] == sum(p.numel() for p in model.finetune_parameters("actor"))
    assert info["scopes"] == {"actor": 8}
    assert info["config"]["dim"] == 32 and info["config"]["depth"] == 2


def test_state_dict_and_adapter(tmp_path, capsys):
    model = _model()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    save_adapter(model, "actor", tmp_path / "a.safetensors")
    info = _info(capsys, str(tmp_path / "sd.pt"))
    assert info["kind"] == "state dict" and info["layernorm_gain"] == "absolute"
    assert info["parameters"] == model.num_parameters()
    adapter = _info(capsys, str(tmp_path / "a.safetensors"))
    assert adapter["kind"] == "lora adapter" and adapter["scope"] == "actor" and adapter["lora_r"] == 8
    assert adapter["parameters"] == sum(p.numel() for p in model.finetune_parameters("actor"))


def test_missing_path_is_a_clear_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nothere")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_reader_gone_exits_quietly(tmp_path):
    """`palm-rlhf info RUN | head` must not print a BrokenPipeError traceback."""
    import os
    import subprocess
    import sys

    _model().save_pretrained(tmp_path / "m")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write
    try:
        done = subprocess.run([sys.executable, "-m", "palm_rlhf", "info", str(tmp_path / "m")], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert done.stderr == "" and done.returncode == 141


def test_run_directory_with_record(tmp_path, capsys):
    from palm_rlhf.data.tokenizer import ByteTokenizer

    final = tmp_path / "ppo" / "final"
    _model().save_pretrained(final)
    ByteTokenizer().save(final)
    (final / "run.json").write_text(json.dumps({"algorithm": "ppo", "steps": 3}))
    info = _info(capsys, str(tmp_path / "ppo"))
    assert info["resolved"] == str(final)
    assert info["run"] == {"algorithm": "ppo", "steps": 3}
    assert info["tokenizer"] == "ByteTokenizer(vocab_size=256)"
