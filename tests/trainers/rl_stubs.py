"""Driving an RL trainer's step with rollouts whose lengths, KL and scores the test chooses, and a
reward source that remembers what it returned.

`patch_collect` replaces the trainer's rollout collection (nothing is sampled): each step gets the
rows listed for it, with the policy's true log-probs as old log-probs (ratio 1 at the first epoch)
and a reference placed so that each row's summed k1 KL is exactly the chosen value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from palm_rlhf.rl.rewards import RewardSource
from palm_rlhf.generation.scoring import pack_sequences
from palm_rlhf.rl.rollout import Rollout
from palm_rlhf.trainers import rl_base
from rl_fixtures import vowel_fraction


@dataclass(frozen=True)
class Row:
    length: int            # response tokens (the EOS included when stop == "eos")
    kl: float              # the row's k1 KL summed over its tokens (spread evenly over them)
    score: float
    stop: str = "eos"


def stub_rollout(trainer, prompts: list[torch.Tensor], rows: list[Row], first: int = 0) -> Rollout:
    """Rows `first`, `first` + 1, ... of a step (the response tokens depend on the global row index)."""
    b, T = len(rows), max(r.length for r in rows)
    vocab = trainer.model.num_tokens
    plens = torch.tensor([p.numel() for p in prompts])
    prompt_ids = torch.zeros(b, int(plens.max()), dtype=torch.long)
    for i, p in enumerate(prompts):
        prompt_ids[i, : p.numel()] = p
    mask = torch.arange(T)[None, :] < torch.tensor([r.length for r in rows])[:, None]
    responses = ((torch.arange(first, first + b)[:, None] * 7 + torch.arange(T)[None, :] * 3) % (vocab - 1) + 1) * mask
    kl_tok = torch.tensor([[r.kl / r.length] * T for r in rows]) * mask
    packed = pack_sequences(prompt_ids, plens, responses, mask)
    logp, _, values = trainer.scorer.rollout(packed)  # values: PPO's critic (None without one)
    return Rollout(prompts=prompt_ids, prompt_lengths=plens, responses=responses, mask=mask, old_log_probs=logp,
                   ref_log_probs=logp - kl_tok, scores=torch.tensor([r.score for r in rows]), values=values,
                   stop_reasons=[r.stop for r in rows])


class StubCollector:
    """Stands in for `collect_rollout`: step s gets rows[s] (all ranks' rows, this rank takes its share).
    Records, per step, the rollout handed to the trainer and one draw from each row's sampling generator."""

    def __init__(self, trainer, rows: list[list[Row]]):
        self.trainer, self.rows = trainer, rows
        self.rollouts: list[Rollout] = []
        self.noise: list[list[float]] = []

    def __call__(self, scorer, prompts, sampling, reward, *, generator=None):
        step_rows = self.rows[len(self.rollouts)]
        share = len(step_rows) // self.trainer.env.world_size
        assert len(prompts) == share, "one collection call per step: rollout_batch_size >= rows per rank"
        first = self.trainer.env.rank * share
        self.noise.append([float(torch.rand((), generator=g)) for g in generator])
        rollout = stub_rollout(self.trainer, list(prompts), step_rows[first:first + share], first)
        self.rollouts.append(rollout)
        return rollout


def patch_collect(monkeypatch, trainer, rows: list[list[Row]]) -> StubCollector:
    collector = StubCollector(trainer, rows)
    monkeypatch.setattr(rl_base, "collect_rollout", collector)
    return collector


class RecordingReward(RewardSource):
    """The vowel-fraction reward; remembers per call the scores it returned, each response's length in
    tokens (the completion plus its EOS, which the completion omits) and whether it ended in EOS."""

    def __init__(self):
        self.calls: list[tuple[list[float], list[int], list[bool]]] = []

    def score(self, prompts, completions, stop_reasons):
        scores = vowel_fraction(prompts, completions)
        eos = [r == "eos" for r in stop_reasons]
        self.calls.append((scores, [c.numel() + e for c, e in zip(completions, eos)], eos))
        return scores


def assert_rollout_metrics_match(history: list[dict], reward: RecordingReward) -> None:
    """Each step's reward mean/std, response length and EOS rate equal what the reward source saw
    (one reward call per step), and the KL to the reference is 0 before the first update."""
    assert len(reward.calls) == len(history)
    for row, (scores, lengths, eos) in zip(history, reward.calls):
        s = torch.tensor(scores, dtype=torch.float64)
        assert abs(row["reward_mean"] - float(s.mean())) <= 1e-6, (row["reward_mean"], float(s.mean()))
        assert abs(row["reward_std"] - float(s.std(unbiased=False))) <= 1e-5
        assert row["response_length"] == sum(lengths) / len(lengths)
        assert row["eos_rate"] == sum(eos) / len(eos)
    assert abs(history[0]["kl_ref"]) <= 1e-5, history[0]["kl_ref"]


def assert_learns_vowel_rule(trainer_cls, config, model, prompts, min_gain: float = 0.1, max_kl: float = 20.0) -> None:
    """Train `config` on the vowel reward: the mean reward of the last 3 steps is >= `min_gain` above the first
    step's, with KL <= `max_kl` nats/sequence in those steps, and the logged rollout metrics are the reward's."""
    reward = RecordingReward()
    trainer = trainer_cls(config, model=model, reward=reward, prompts=prompts)
    try:
        history = trainer.setup().train()
    finally:
        trainer.cleanup()
    assert_rollout_metrics_match(history, reward)
    gain = sum(h["reward_mean"] for h in history[-3:]) / 3 - history[0]["reward_mean"]
    assert gain >= min_gain, [round(h["reward_mean"], 3) for h in history]
    assert max(h["kl_ref"] for h in history[-3:]) <= max_kl, [round(h["kl_ref"], 2) for h in history]
