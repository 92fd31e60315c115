"""Pretraining: exact resume after SIGTERM, NaN stops with the checkpoint intact, errors before
training, micro-batch x accumulation == one big batch, the final save_pretrained directory."""

import os
import signal

import pytest
import torch

from palm_rlhf.data.tokenizer import load_tokenizer
from palm_rlhf.errors import ConfigError, DataError, TrainingError
from palm_rlhf.model import PaLM
from palm_rlhf.runtime.checkpoint import CheckpointManager
from palm_rlhf.runtime.metrics import read_metrics
from palm_rlhf.runtime.run import RunInterrupted
from palm_rlhf.trainers.pretrain import PretrainTrainer

from pretrain_testing import tiny_config, write_corpus


def _train(config, patch_loss=None):
    trainer = PretrainTrainer(config)
    try:
        trainer.setup()
        if patch_loss is not None:
            original = trainer.loss
            trainer.loss = lambda batch: patch_loss(trainer, original, batch)
        return trainer, trainer.train()
    finally:
        trainer.cleanup()


def _losses(run_dir):
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


@pytest.mark.slow
def test_sigterm_then_resume_repeats_the_uninterrupted_losses(tmp_path):
    corpus = write_corpus(tmp_path)
    _train(tiny_config(tmp_path, corpus, out="full"))

    def stop_at_4(trainer, loss, batch):
        if trainer.step == 3:  # during the 4th step: finish it, save, exit
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(batch)

    with pytest.raises(RunInterrupted, match="resume with the same command"):
        _train(tiny_config(tmp_path, corpus, out="cut"), stop_at_4)
    assert CheckpointManager(tmp_path / "cut").load()["step"] == 4
    assert not (tmp_path / "cut" / "final").exists()
    trainer, summary = _train(tiny_config(tmp_path, corpus, out="cut"))  # resume=auto
    assert trainer.step == summary["step"] == 6
    full, cut = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert sorted(cut) == [1, 2, 3, 4, 5, 6]
    assert cut == full  # bit-identical, not approximately equal
    a = PaLM.from_pretrained(tmp_path / "full" / "final").state_dict()
    b = PaLM.from_pretrained(tmp_path / "cut" / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_tokenizer(tmp_path / "cut" / "final").vocab_size == 256
    val = [r for r in read_metrics(tmp_path / "full") if "val/loss" in r]
    assert [r["step"] for r in val] == [3, 6] and val[0]["val/bpb"] > 0


def test_nan_loss_names_the_step_and_keeps_the_last_checkpoint(tmp_path):
    corpus = write_corpus(tmp_path)

    def nan_at_5(trainer, loss, batch):
        value = loss(batch)
        return (value[0] * float("nan"), value[1]) if trainer.step == 4 else value  # 4 done: the 5th diverges

    with pytest.raises(TrainingError, match="step 5: loss is nan"):
        _train(tiny_config(tmp_path, corpus, "save_every=2"), nan_at_5)
    mgr = CheckpointManager(tmp_path / "run")
    assert mgr.latest().name == "step_00000004" and mgr.load()["step"] == 4
    weights = PaLM.from_pretrained(mgr.latest()).state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.slow
def test_accumulation_equals_a_big_batch(tmp_path):
    """batch_size 4 in one micro-batch and in 4 micro-batches of 1 see the same 4 windows per step."""
    corpus = write_corpus(tmp_path)
    _train(tiny_config(tmp_path, corpus, "max_steps=3", "eval.every=0", out="big"))
    _train(tiny_config(tmp_path, corpus, "max_steps=3", "eval.every=0", "micro_batch_size=1",
                       out="small"))
    big, small = _losses(tmp_path / "big"), _losses(tmp_path / "small")
    assert sorted(big) == sorted(small) == [1, 2, 3]
    for step in big:
        assert small[step] == pytest.approx(big[step], abs=1e-5)


def test_errors_before_training(tmp_path):
    corpus = write_corpus(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        _train(tiny_config(tmp_path, tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        _train(tiny_config(tmp_path, empty, out="e"))
    short = tmp_path / "short.txt"
    short.write_text("too short\n")
    with pytest.raises(DataError, match="shorter than one sequence"):
        _train(tiny_config(tmp_path, short, out="s"))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="a_file' is a file; choose another out_dir"):
        _train(tiny_config(tmp_path, corpus, out="a_file/run"))
    with pytest.raises(ConfigError, match="unknown config key 'model.width'"):
        tiny_config(tmp_path, corpus, "model.width=3")
