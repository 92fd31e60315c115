"""runtime.resolve: what a model path may name, and the tokenizer that follows the model."""

from __future__ import annotations

import logging

import pytest
import torch

from palm_rlhf.data.tokenizer import ByteTokenizer, load_tokenizer, train_bpe
from palm_rlhf.errors import ConfigError
from palm_rlhf.model import PaLM
from palm_rlhf.runtime.checkpoint import CheckpointManager
from palm_rlhf.runtime.resolve import ModelSource, check_tokenizer_fits, load_tokenizer_for, resolve_model

TEXT = ["the quick brown fox jumps over the lazy dog. " * 20, "pack my box with five dozen liquor jugs. " * 20]


@pytest.fixture(scope="module")
def bpe():
    pytest.importorskip("tokenizers")
    return train_bpe(TEXT, vocab_size=300)


def _save_model(directory, tokenizer=None, num_tokens=320):
    torch.manual_seed(0)
    PaLM(dim=16, num_tokens=num_tokens, depth=1, heads=2, dim_head=8).save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def _run(tmp_path, bpe, *, final=True, steps=(2, 4)):
    """A run directory like the runtime writes: checkpoints/step_N/ (+ latest) and final/."""
    run = tmp_path / "ppo"
    manager = CheckpointManager(run)
    torch.manual_seed(0)
    model = PaLM(dim=16, num_tokens=320, depth=1, heads=2, dim_head=8)
    for step in steps:
        manager.save(step, {"step": step}, model=model, tokenizer=bpe)
    if final:
        _save_model(run / "final", bpe)
    return run


def test_run_directory_resolves_to_its_final(tmp_path, bpe):
    run = _run(tmp_path, bpe)
    source = resolve_model(run)
    assert source == ModelSource(model_dir=run / "final", tokenizer_dir=run / "final", run_dir=run)
    assert source.name == "ppo"
    # the final/ itself names the same model and the same run
    assert resolve_model(run / "final") == source
    assert resolve_model(str(run / "final")).name == "ppo"


def test_step_directory_and_checkpoints_folder(tmp_path, bpe):
    run = _run(tmp_path, bpe)
    step = run / "checkpoints" / "step_00000002"
    source = resolve_model(step)
    assert source == ModelSource(model_dir=step, tokenizer_dir=step, run_dir=run)
    assert source.name == "ppo-step_00000002"
    assert resolve_model(run / "checkpoints").model_dir == run / "checkpoints" / "step_00000004"


def test_run_without_final_uses_latest_checkpoint_with_a_warning(tmp_path, bpe, caplog):
    run = _run(tmp_path, bpe, final=False)
    with caplog.at_level(logging.WARNING, logger="palm_rlhf.runtime.resolve"):
        source = resolve_model(run)
    assert source.model_dir == run / "checkpoints" / "step_00000004"
    assert source.run_dir == run
    assert "no final/" in caplog.text and "step_00000004" in caplog.text


def test_standalone_model_directory_without_tokenizer(tmp_path):
    directory = _save_model(tmp_path / "exported")
    source = resolve_model(directory)
    assert source == ModelSource(model_dir=directory, tokenizer_dir=None, run_dir=None)
    assert source.name == "exported"


def test_resolving_does_not_clean_up_the_run(tmp_path, bpe):
    run = _run(tmp_path, bpe, final=False)
    orphan = run / "checkpoints" / ".tmp-step_00000006-123"
    orphan.mkdir()
    resolve_model(run)
    assert orphan.is_dir()  # only a trainer's start-up removes orphans, never a reader


@pytest.mark.parametrize("make, expect", [
    (lambda p: p / "missing", "no such file or directory"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "it is empty"),
    (lambda p: (p / "w.pt").write_bytes(b"x") and p / "w.pt", "palm-rlhf convert"),
])
def test_anything_else_says_what_was_expected(tmp_path, make, expect):
    with pytest.raises(ConfigError) as e:
        resolve_model(make(tmp_path))
    assert expect in str(e.value)
    assert "run directory" in str(e.value) and "step directory" in str(e.value)


def test_unrecognised_directory_lists_what_is_there(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "data").mkdir()
    with pytest.raises(ConfigError, match=r"it holds data/, notes.txt"):
        resolve_model(tmp_path)


def test_tokenizer_follows_the_model(tmp_path, bpe):
    run = _run(tmp_path, bpe)
    assert load_tokenizer_for(resolve_model(run)) == bpe
    assert load_tokenizer_for(resolve_model(run / "checkpoints" / "step_00000002")) == bpe


def test_tokenizer_override_wins(tmp_path, bpe):
    run = _run(tmp_path, bpe)
    source = resolve_model(run)
    assert isinstance(load_tokenizer_for(source, "byte"), ByteTokenizer)
    tok_dir = bpe.save(tmp_path / "tok")
    bare = _save_model(tmp_path / "bare")
    assert load_tokenizer_for(resolve_model(bare), str(tok_dir)) == bpe
    assert load_tokenizer_for(resolve_model(bare), str(tok_dir / "tokenizer_config.json")) == bpe
    # a run directory as the override: the tokenizer saved with its model
    assert load_tokenizer_for(resolve_model(bare), str(run)) == bpe
    with pytest.raises(ConfigError, match="tokenizer=.*tokenizer train"):
        load_tokenizer_for(source, str(tmp_path / "nowhere"))


def test_no_saved_tokenizer_falls_back_to_bytes_with_a_warning(tmp_path, caplog):
    source = resolve_model(_save_model(tmp_path / "bare"))
    with caplog.at_level(logging.WARNING, logger="palm_rlhf.runtime.resolve"):
        tokenizer = load_tokenizer_for(source)
    assert isinstance(tokenizer, ByteTokenizer)
    assert "byte tokenizer" in caplog.text and "bare" in caplog.text


def test_saved_tokenizer_round_trips_byte_for_byte(tmp_path, bpe):
    run = _run(tmp_path, bpe)
    source = resolve_model(run)
    assert (source.tokenizer_dir / "tokenizer.json").read_bytes() == (bpe.save(tmp_path / "t") / "tokenizer.json").read_bytes()
    assert load_tokenizer(source.tokenizer_dir).encode("the lazy dog") == bpe.encode("the lazy dog")


def test_check_tokenizer_fits(bpe):
    check_tokenizer_fits(bpe, 300, "model=x")   # equal: fits
    check_tokenizer_fits(ByteTokenizer(), 300, "model=x")
    with pytest.raises(ConfigError) as e:
        check_tokenizer_fits(bpe, 256, "model=runs/base")
    message = str(e.value)
    assert message.startswith("model=runs/base:") and "300" in message and "256" in message
    assert "tokenizer=" in message
