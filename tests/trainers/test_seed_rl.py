"""The seed package's GRPO, FlowRL and TPO trainers, driven through the seed's call pattern
(palm_rlhf_pytorch 0.8.0: constructor keywords, `train(num_episodes=..., ...)`, `generate(...)`,
`save`/`load`), run on this package's trainers."""

import pytest
import torch

from palm_rlhf.errors import ConfigError
from palm_rlhf.model.palm import PaLM
from palm_rlhf.model.reward import RewardModel


def _models():
    torch.manual_seed(0)
    palm = PaLM(dim=32, num_tokens=64, depth=1, heads=2, dim_head=16)
    rm = RewardModel(palm, dropout=0.0)
    prompts = torch.randint(1, 64, (10, 6))
    prompts[0, 4:] = 0  # padding is stripped, as in the seed
    return palm, rm, prompts


def _drive(trainer, tmp_path):
    """The seed's calls: 2 episodes x 2 timesteps, an update every 2 timesteps -> 2 updates; best-of-n
    generate; save and load of the actor."""
    history = trainer.train(num_episodes=2, max_timesteps=2, update_timesteps=2, max_batch_size=4, max_seq_len=14,
                            eos_token=3, temperature=1.0)
    assert len(history) == 2
    assert abs(history[0]["kl_ref"]) < 1e-5 and history[-1]["kl_ref"] != 0.0  # the actor moved
    out = trainer.generate(12, prompt=torch.tensor([5, 6, 7]), num_samples=3, eos_token=3)
    assert out.ndim == 1 and out[:3].tolist() == [5, 6, 7] and out.numel() <= 12
    trainer.save(str(tmp_path / "actor.pt"))
    saved = {k: v.clone() for k, v in trainer.palm.finetune_modules["actor"].state_dict().items()}
    for p in trainer.palm.finetune_modules["actor"].parameters():
        torch.nn.init.zeros_(p)
    trainer.load(str(tmp_path / "actor.pt"))
    assert all(torch.equal(v, saved[k]) for k, v in trainer.palm.finetune_modules["actor"].state_dict().items())
    return history


@pytest.mark.parametrize("switches", [
    {}, dict(use_simple_policy_optimization=True), dict(use_dr_grpo=True), dict(dr_grpo_constant=3.0),
    dict(use_max_rl=True), dict(use_score_centering=True, score_centering_topk=8),
    dict(add_entropy_to_advantage=True, entropy_to_advantage_scale=0.4, entropy_to_advantage_kappa=2.0)])
def test_grpo_rlhf_trainer_with_each_seed_switch(tmp_path, switches):
    from palm_rlhf.grpo import RLHFTrainer
    palm, rm, prompts = _models()
    trainer = RLHFTrainer(palm=palm, reward_model=rm, prompt_token_ids=prompts, grpo_num_times_sample_rewards=3,
                          minibatch_size=4, epochs=2, max_norm=1.0, out_dir=str(tmp_path / "run"), **switches)
    history = _drive(trainer, tmp_path)
    o = trainer.options
    expected = ("constant" if "use_dr_grpo" in switches or "dr_grpo_constant" in switches else
                "mean" if "use_max_rl" in switches else "std")
    assert o["advantage_norm"] == expected
    assert o["advantage_constant"] == switches.get("dr_grpo_constant", 4.0)  # the seed's default: the group size
    assert o["policy_loss"] == ("spo" if "use_simple_policy_optimization" in switches else
                                "score_centering" if "use_score_centering" in switches else "clip")
    assert o["entropy_advantage"]["scale"] == (0.4 if "add_entropy_to_advantage" in switches else 0.0)
    assert "zero_variance_groups" in history[0]


def test_grpo_score_centering_weight_fn_reaches_the_loss(tmp_path):
    """A callable weight (the seed's score_centering_weight_fn) is handed to the loss: it is called."""
    from palm_rlhf.grpo import RLHFTrainer
    calls = []

    def truncated(ratio):
        calls.append(ratio.shape)
        return ratio.clamp(max=2.0)

    palm, rm, prompts = _models()
    trainer = RLHFTrainer(palm=palm, reward_model=rm, prompt_token_ids=prompts, grpo_num_times_sample_rewards=3,
                          minibatch_size=8, use_score_centering=True, score_centering_weight_fn=truncated,
                          out_dir=str(tmp_path / "run"))
    trainer.train(num_episodes=1, max_timesteps=2, update_timesteps=2, max_batch_size=4, max_seq_len=14, eos_token=3)
    assert calls


def test_grpo_exclusive_switches_and_full_weights_are_errors():
    from palm_rlhf.grpo import RLHFTrainer
    palm, rm, prompts = _models()
    with pytest.raises(ConfigError, match="exclusive"):
        RLHFTrainer(palm=palm, reward_model=rm, prompt_token_ids=prompts, use_dr_grpo=True, use_max_rl=True)
    with pytest.raises(ConfigError, match="exclusive"):
        RLHFTrainer(palm=palm, reward_model=rm, prompt_token_ids=prompts, use_simple_policy_optimization=True,
                    use_score_centering=True)
    with pytest.raises(ConfigError, match="actor_lora=True"):
        RLHFTrainer(palm=palm, reward_model=rm, prompt_token_ids=prompts, actor_lora=False)


def test_flowrl_trainer(tmp_path):
    from palm_rlhf.flowrl import FlowRLTrainer
    palm, rm, prompts = _models()
    trainer = FlowRLTrainer(palm=palm, reward_model=rm, prompt_token_ids=prompts, flowrl_num_times_sample=3,
                            beta=5.0, minibatch_size=4, partition_function_hidden_dim=16,
                            partition_function_lr=1e-4, out_dir=str(tmp_path / "run"))
    history = _drive(trainer, tmp_path)
    assert trainer.partition_function is not None and history[-1]["log_z"] != 0.0


def test_tpo_trainer(tmp_path):
    """The seed's TPO minibatches count groups: minibatch_size 1 with groups of 4 -> 4 rows per update."""
    from palm_rlhf.tpo import RLHFTrainer
    palm, rm, prompts = _models()
    trainer = RLHFTrainer(palm=palm, reward_model=rm, prompt_token_ids=prompts, num_times_sample_rewards=3,
                          minibatch_size=1, tpo_eta=0.5, out_dir=str(tmp_path / "run"))
    assert trainer._batch_size(update_timesteps=2) == 4
    _drive(trainer, tmp_path)
