"""The RL progress bar: on stderr with reward, KL and seconds per step when `progress` is on,
absent when it is off; the quickstart's --no-progress reaches the RL trainer's config."""

import pytest
import torch

from palm_rlhf.model.palm import PaLM
from palm_rlhf.trainers.grpo import GRPOConfig, GRPOTrainer
from rl_fixtures import EOS, rl_prompts, vowel_fraction


def run_grpo(tmp_path, progress: bool):
    torch.manual_seed(0)
    model = PaLM(dim=16, num_tokens=128, depth=1, heads=2, dim_head=8)
    config = GRPOConfig(out_dir=str(tmp_path / f"grpo_{progress}"), max_steps=2, prompts_per_step=2, group_size=2,
                        minibatch_size=4, max_new_tokens=4, eos_token=EOS, sample_every=0, progress=progress)
    trainer = GRPOTrainer(config, model=model, reward=vowel_fraction, prompts=rl_prompts())
    try:
        return trainer.setup().train()
    finally:
        trainer.cleanup()


@pytest.mark.parametrize("progress", [True, False])
def test_bar_on_stderr_only_when_progress_is_on(tmp_path, capsys, progress):
    history = run_grpo(tmp_path, progress)
    assert len(history) == 2
    err = capsys.readouterr().err
    if progress:
        assert "grpo" in err and "2/2" in err, err
        assert "reward_mean=" in err and "kl_ref=" in err, err
    else:
        assert "2/2" not in err and "reward=" not in err, err


def test_quickstart_no_progress_reaches_the_rl_config(tmp_path, monkeypatch):
    from palm_rlhf.data.tokenizer import ByteTokenizer
    from palm_rlhf.trainers import quickstart as qs

    seen = {}

    class Capture:
        def __init__(self, config, **_):
            seen["progress"] = config.progress

        def setup(self):
            return self

    quickstart = qs.Quickstart(qs.QuickstartConfig(out=str(tmp_path), progress=False))
    monkeypatch.setattr(quickstart, "_load_policy", lambda: (None, ByteTokenizer()))
    monkeypatch.setattr(quickstart, "_prompts", lambda tokenizer, k, seed: ["a b"] * k)
    monkeypatch.setattr(qs.RewardModel, "from_pretrained", classmethod(lambda cls, *a, **k: torch.nn.Identity()))
    monkeypatch.setattr(qs, "PPOTrainer", Capture)
    quickstart._rl_trainer(tmp_path)
    assert seen == {"progress": False}
