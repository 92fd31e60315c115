import json
from pathlib import Path

import pytest
import torch

from palm_rlhf import PaLM
from palm_rlhf.data.preferences import RatingRecord, write_preferences
from palm_rlhf.data.synthetic import rule_preference_pairs
from palm_rlhf.data.tokenizer import CONFIG_NAME, ByteTokenizer, load_tokenizer
from palm_rlhf.errors import ConfigError, DataError
from palm_rlhf.model.reward import RewardModel
from palm_rlhf.runtime.config import load_config
from palm_rlhf.trainers.reward import RewardTrainConfig, RewardTrainer
from palm_rlhf.trainers.reward_score import score_records

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "reward"


class Bytes:
    def encode(self, s):
        return list(s.encode())


@pytest.fixture
def base(tmp_path):
    torch.manual_seed(0)
    return str(PaLM(num_tokens=256, dim=32, depth=1, heads=2, dim_head=16).save_pretrained(tmp_path / "base"))


def _config(base, data, out, **kw):
    overrides = [f"model={base}", f"data={data}", f"out_dir={out}", "progress=false", *[f"{k}={v}" for k, v in kw.items()]]
    return load_config(RewardTrainConfig, None, overrides)


def test_resumed_run_equals_uninterrupted_run(tmp_path, base):
    """3 steps + checkpoint + a fresh trainer resuming for 3 more == 6 steps in one go
    (dropout on, so the RNG state must be restored too)."""
    data = tmp_path / "p.jsonl"
    write_preferences(data, rule_preference_pairs(40, seed=0))
    kw = {"max_steps": 6, "batch_size": 8, "micro_batch_size": 4, "dropout": 0.1, "save_every": 100,
          "eval.fraction": 0.0, "optim.lr": 1e-2}

    whole = RewardTrainer(_config(base, data, tmp_path / "a", **kw), tokenizer=Bytes()).setup()
    whole.train()

    first = RewardTrainer(_config(base, data, tmp_path / "b", **kw), tokenizer=Bytes()).setup()
    for _ in range(3):
        first.run.advance(first)
    first.run.save_checkpoint(first)
    second = RewardTrainer(_config(base, data, tmp_path / "b", **kw), tokenizer=Bytes()).setup()
    assert second.step == 3
    second.train()

    a, b = whole.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    final = RewardModel.from_pretrained(tmp_path / "b" / "final").state_dict()
    assert all(torch.equal(final[k], b[k]) for k in b)
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step_00000006"


def test_config_errors_name_the_field(tmp_path, base):
    with pytest.raises(ConfigError, match="unknown config key 'lrr'"):
        load_config(RewardTrainConfig, None, ["lrr=1"])
    with pytest.raises(ConfigError, match="objective"):
        load_config(RewardTrainConfig, None, ["objective=hinge"])
    cfg = load_config(RewardTrainConfig, CONFIGS / "pairwise.yaml", ["optim.lr=1e-3"])
    assert cfg.optim.lr == 1e-3 and cfg.objective == "pairwise"
    for name in ("ratings.yaml", "full_finetune.yaml"):
        load_config(RewardTrainConfig, CONFIGS / name)
    ratings = tmp_path / "r.jsonl"
    write_preferences(ratings, [RatingRecord("p", "a", 1), RatingRecord("p", "b", 2)])
    with pytest.raises(ConfigError, match="rating"):
        RewardTrainer(_config(base, ratings, tmp_path / "o", objective="pairwise"), tokenizer=Bytes()).setup()


def test_binned_ratings_train_and_report_accuracy_and_mae(tmp_path, base):
    data = tmp_path / "r.jsonl"
    write_preferences(data, [RatingRecord("p", "a" * (i % 3 + 1), i % 3) for i in range(12)])
    trainer = RewardTrainer(_config(base, data, tmp_path / "o", max_steps=2, batch_size=4, num_bins=3,
                                    **{"eval.fraction": 0.25, "eval.every": 1}), tokenizer=Bytes()).setup()
    metrics = trainer.train()
    assert trainer.objective == "binned" and set(metrics) == {"accuracy", "mae", "loss"}
    rows = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert any("val/mae" in r for r in rows)


@pytest.mark.slow
def test_learns_a_known_preference_rule_and_its_opposite(tmp_path, base):
    """Held-out pairs judged by the vowel rule: >= 95% accuracy after training on the rule,
    <= 5% after training on the same pairs with chosen and rejected swapped."""
    train_pairs = rule_preference_pairs(512, seed=1)
    held_out = rule_preference_pairs(200, seed=2)
    write_preferences(tmp_path / "train.jsonl", train_pairs)
    write_preferences(tmp_path / "swapped.jsonl", [r.swapped() for r in train_pairs])
    write_preferences(tmp_path / "val.jsonl", held_out)
    results = {}
    for name in ("train", "swapped"):
        trainer = RewardTrainer(_config(base, tmp_path / f"{name}.jsonl", tmp_path / name, max_steps=150,
                                        batch_size=16, **{"optim.lr": 3e-3, "eval.data": tmp_path / "val.jsonl",
                                                          "eval.every": 150}),
                                tokenizer=Bytes()).setup()
        trainer.train()
        rc, rr = score_records(RewardModel.from_pretrained(tmp_path / name / "final"), Bytes(), held_out)
        results[name] = (rc > rr).float().mean().item()
    assert results["train"] >= 0.95, results
    assert results["swapped"] <= 0.05, results


def _pairs(tmp_path, n=40):
    data = tmp_path / "p.jsonl"
    write_preferences(data, rule_preference_pairs(n, seed=0))
    return data


def test_accumulated_micro_batches_equal_one_big_batch(tmp_path, base):
    """batch_size 8 in micro-batches of 4 reads the same 8 pairs per step as one micro-batch of 8
    (batches are a function of the step), and TrainStep weights each micro-batch by its 4 pairs, so
    the weights after 2 steps agree up to float summation order."""
    data = _pairs(tmp_path)
    kw = {"max_steps": 2, "eval.fraction": 0.0, "optim.lr": 1e-2, "optim.warmup": 0, "batch_size": 8}
    small = RewardTrainer(_config(base, data, tmp_path / "a", micro_batch_size=4, **kw), tokenizer=Bytes()).setup()
    big = RewardTrainer(_config(base, data, tmp_path / "b", **kw), tokenizer=Bytes()).setup()
    losses = [(small.run.advance(small)["train/loss"], big.run.advance(big)["train/loss"]) for _ in range(2)]
    assert all(abs(a - b) < 1e-6 for a, b in losses), losses
    a, b = small.model.state_dict(), big.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_precision_runs_the_forward_under_autocast(tmp_path, base):
    """precision=bf16 goes through TrainStep's autocast: the head computes in bfloat16 (fp32 in an
    fp32 run), and the same first step's loss agrees with fp32's to bf16 accuracy (8 mantissa bits:
    about 3e-3 relative, so within 1e-2 of a loss near 0.8). fp16 needs CUDA and says so."""
    data = _pairs(tmp_path)
    losses, dtypes = {}, {}
    for precision in ("fp32", "bf16"):
        trainer = RewardTrainer(_config(base, data, tmp_path / precision, batch_size=8, **{"eval.fraction": 0.0},
                                        precision=precision), tokenizer=Bytes()).setup()
        seen = []
        trainer.model.to_pred.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
        losses[precision] = trainer.run.advance(trainer)["train/loss"]
        dtypes[precision] = set(seen)
    assert dtypes == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}
    assert abs(losses["bf16"] - losses["fp32"]) < 1e-2, losses
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
            RewardTrainer(_config(base, data, tmp_path / "fp16", precision="fp16", device="cpu"),
                          tokenizer=Bytes()).setup()


def test_tokenizer_saved_with_the_base_is_used_and_a_broken_one_raises(tmp_path, base):
    """A tokenizer saved next to the base is used and saved with checkpoints and the final model;
    an unreadable one is an error, not a silent fall back to bytes."""
    data = _pairs(tmp_path, 20)
    ByteTokenizer().save(base)
    trainer = RewardTrainer(_config(base, data, tmp_path / "o", max_steps=1, batch_size=4,
                                    **{"eval.fraction": 0.0})).setup()
    trainer.train()
    assert trainer.tokenizer == ByteTokenizer()
    assert load_tokenizer(tmp_path / "o" / "final") == ByteTokenizer()
    assert load_tokenizer(tmp_path / "o" / "checkpoints" / "step_00000001") == ByteTokenizer()
    (Path(base) / CONFIG_NAME).write_text("{not json")
    with pytest.raises(DataError, match="unreadable tokenizer config"):
        RewardTrainer(_config(base, data, tmp_path / "p", max_steps=1)).setup()
