"""`palm-rlhf generate` end to end on a tiny checkpoint."""

from __future__ import annotations

import pytest
import torch

from palm_rlhf.cli.main import main
from palm_rlhf.model import PaLM


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt")
    PaLM(dim=32, num_tokens=256, depth=1, heads=2, dim_head=16).save_pretrained(path)
    return path


def run_cli(capsys, *argv):
    code = main(["generate", *map(str, argv)])
    return code, capsys.readouterr()


def test_stream_prints_the_same_text_as_batch_generation(checkpoint, capsys):
    args = (checkpoint, "--prompt", "ROMEO:", "--max-new-tokens", 12, "--seed", 3, "--no-eos")
    code, plain = run_cli(capsys, *args)
    assert code == 0 and plain.out.startswith("ROMEO:")
    code, streamed = run_cli(capsys, *args, "--stream")
    assert code == 0 and streamed.out == plain.out


def test_num_samples_prints_one_block_per_sample(checkpoint, capsys):
    code, res = run_cli(capsys, checkpoint, "--prompt", "Hi", "--max-new-tokens", 4, "--num-samples", 3,
                        "--top-k", 5, "--seed", 0)
    assert code == 0 and res.out.count("--- sample") == 3


@pytest.mark.parametrize("argv, message", [
    (("--top-p", "0"), "--top-p"),
    (("--max-new-tokens", "0"), "--max-new-tokens"),
    (("--stream", "--num-samples", "2"), "--stream"),
])
def test_bad_options_exit_2_naming_the_flag(checkpoint, capsys, argv, message):
    code, res = run_cli(capsys, checkpoint, "--prompt", "x", *argv)
    assert code == 2 and message in res.err


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    code, res = run_cli(capsys, tmp_path / "nope", "--prompt", "x")
    assert code == 2 and "save_pretrained" in res.err


def test_unreadable_saved_tokenizer_is_an_error_not_bytes(tmp_path, capsys):
    """Only a missing tokenizer falls back to bytes; a saved one that cannot be read exits 2."""
    torch.manual_seed(0)
    PaLM(dim=32, num_tokens=256, depth=1, heads=2, dim_head=16).save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    code, res = run_cli(capsys, tmp_path, "--prompt", "x", "--max-new-tokens", 2)
    assert code == 2 and "unreadable tokenizer config" in res.err
