"""Seed-compatible RLHFTrainer: the seed's call pattern runs on the new PPO machinery."""

import pytest
import torch

from palm_rlhf.errors import ConfigError
from palm_rlhf.model.palm import PaLM
from palm_rlhf.model.reward import RewardModel
from palm_rlhf.trainers.rlhf import RLHFTrainer


def make(tmp_path, **kw):
    torch.manual_seed(0)
    palm = PaLM(dim=32, num_tokens=64, depth=1, heads=2, dim_head=16)
    rm = RewardModel(palm, dropout=0.0)
    prompts = torch.randint(1, 64, (10, 6))
    prompts[0, 4:] = 0  # padding is stripped, as in the seed
    return RLHFTrainer(palm=palm, reward_model=rm, prompt_token_ids=prompts, minibatch_size=8,
                       out_dir=str(tmp_path / "run"), **kw)


def test_seed_train_schedule(tmp_path):
    """2 episodes x 8 timesteps with update_timesteps 8 -> 16 rollouts -> 2 PPO updates; the KL to the
    reference is 0 before the first update."""
    trainer = make(tmp_path, max_norm=1.0)
    assert trainer.prompt_rows[0].tolist() == trainer.prompt_rows[0][trainer.prompt_rows[0] != 0].tolist()
    history = trainer.train(num_episodes=2, max_timesteps=8, update_timesteps=8, max_batch_size=4, max_seq_len=14,
                            eos_token=3)
    assert len(history) == 2
    assert abs(history[0]["kl_ref"]) < 1e-5


def test_best_of_n_returns_the_highest_scoring_sample(tmp_path, monkeypatch):
    """generate(num_samples=6) scores 6 samples with the reward model and returns the prompt + the one it
    scored highest (its EOS kept, padding dropped); the scores really differ, so the worst or any other
    sample would not match."""
    trainer = make(tmp_path)
    rm = trainer.reward_model
    seen = []
    real_score = rm.score

    def spy(prompts, completions, **kw):
        scores = real_score(prompts, completions, **kw)
        seen.append(([c.tolist() for c in completions], scores.tolist()))
        return scores

    monkeypatch.setattr(rm, "score", spy)
    prompt = torch.tensor([5, 6, 7])
    out = trainer.generate(12, prompt=prompt, num_samples=6, eos_token=3)
    (completions, scores), = seen
    assert len(completions) == 6 and len(set(scores)) == 6
    best = completions[max(range(6), key=scores.__getitem__)]
    # the scored completion omits the EOS; the returned sequence keeps it when the sample stopped there
    assert out.tolist() in ([5, 6, 7, *best], [5, 6, 7, *best, 3])
    assert out.numel() <= 12


def test_exactly_one_prompt_source(tmp_path):
    torch.manual_seed(0)
    palm = PaLM(dim=32, num_tokens=64, depth=1, heads=2, dim_head=16)
    with pytest.raises(ConfigError, match="exactly one"):
        RLHFTrainer(palm=palm, reward_model=RewardModel(palm), prompts=["a"], prompt_token_ids=torch.ones(1, 2))
