"""The whole RLHF loop in minutes on a CPU: the engine behind `palm-rlhf quickstart`.

Steps (each writes into its own sub-directory of the run directory and a `done.json`
marker; re-running skips finished steps and resumes an interrupted one from its
checkpoints):

1. ``pretrain``    prepare the built-in corpus (the Python standard library's own files)
                   and pretrain a small byte-level PaLM on it
2. ``preferences`` two samples per prompt from that model, judged by a simulated annotator:
                   a documented rule standing in for people (prefer the completion with the
                   larger share of vowels; `palm_rlhf.data.synthetic.rule_annotator`)
3. ``reward``      a RewardModel (LoRA scope on the pretrained PaLM) and its held-out accuracy
4. ``rl``          PPO (or GRPO) against that reward model, KL-penalised to the start policy
5. ``eval``        before/after on held-out prompts: reward-model score, the annotator's own
                   score, KL to the reference, sample completions; plots and `summary.md`
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..data.preferences import write_preferences
from ..data.synthetic import rule_annotator, rule_score
from ..errors import ConfigError, TrainingError
from ..generation import SamplingConfig, generate
from ..model import PaLM
from ..files import atomic_write_bytes
from ..model.reward import RewardModel
from ..rl.collect import collect_rollout, strip_eos
from ..runtime.run import ADAPTER_NAME, FINAL_NAME
from .base import ModelConfig
from .grpo import GRPOConfig, GRPOTrainer
from .ppo import PPOConfig, PPOTrainer
from .pretrain import DataConfig, PretrainConfig, PretrainTrainer
from .reward import RewardTrainConfig, RewardTrainer

log = logging.getLogger(__name__)

ALGOS = ("ppo", "grpo")
STEPS = ("pretrain", "preferences", "reward", "rl", "eval")


@dataclass
class QuickstartConfig:
    out: str = "runs/quickstart"
    minutes: float = 10.0          # budget for the whole loop; step sizes scale with it
    algo: str = "ppo"
    seed: int = 0
    prompt_bytes: int = 32         # prompts are snippets of held-out stdlib text
    response_tokens: int = 24
    preference_prompts: int = 1024  # one sampled pair each (ties dropped)
    eval_prompts: int = 128
    progress: bool = True

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ConfigError(f"--algo {self.algo!r}: use one of {', '.join(ALGOS)}")
        if not self.minutes > 0:
            raise ConfigError(f"--minutes {self.minutes}: must be > 0")
        for name in ("prompt_bytes", "response_tokens", "preference_prompts", "eval_prompts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")

    def scaled(self, steps_at_10_minutes: int, minimum: int = 2) -> int:
        """A step count proportional to the time budget."""
        return max(minimum, round(steps_at_10_minutes * self.minutes / 10.0))


class Quickstart:
    def __init__(self, config: QuickstartConfig):
        self.config = config
        self.out = Path(config.out)
        self.results: dict = {}

    # ------------------------------------------------------------------ driver

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.out / "quickstart.json", json.dumps(asdict(self.config), indent=2).encode())
        for name in STEPS:
            step_dir = self.out / name
            marker = step_dir / "done.json"
            if marker.is_file():
                log.info("quickstart: %s already done (delete %s to redo it)", name, step_dir)
                self.results[name] = json.loads(marker.read_text())
                continue
            log.info("quickstart: %s ...", name)
            step_dir.mkdir(parents=True, exist_ok=True)
            result = getattr(self, f"step_{name}")(step_dir)
            atomic_write_bytes(marker, json.dumps(result, indent=2).encode())
            self.results[name] = result
        return self.results

    # ------------------------------------------------------------------ helpers

    def _pretrained(self) -> Path:
        return self.out / "pretrain" / "final"

    def _adapter(self) -> Path:
        """The RL step's trained actor scope alone (written by the run into final/)."""
        return self.out / "rl" / FINAL_NAME / ADAPTER_NAME

    def _load_policy(self) -> tuple[PaLM, object]:
        from ..data.tokenizer import load_tokenizer

        return PaLM.from_pretrained(self._pretrained()), load_tokenizer(self._pretrained())

    def _prompts(self, tokenizer, n: int, seed: int) -> list[str]:
        """`n` snippets of the held-out split, each starting at a line start."""
        from ..data.corpus import load_tokens

        tokens = load_tokens(self.out / "pretrain" / "data", "val")
        text = tokenizer.decode(tokens[: min(len(tokens), 400_000)].tolist())
        rng = random.Random(seed)
        size = self.config.prompt_bytes
        starts = [i + 1 for i, c in enumerate(text) if c == "\n" and i + 1 + size < len(text)]
        out = []
        while len(out) < n:
            s = rng.choice(starts)
            snippet = text[s:s + size]
            if snippet.strip() and "\x00" not in snippet:
                out.append(snippet)
        return out

    # ------------------------------------------------------------------ steps

    def step_pretrain(self, step_dir: Path) -> dict:
        c = self.config
        steps = c.scaled(1200, minimum=10)
        config = PretrainConfig(
            out_dir=str(step_dir), data=DataConfig(sources=("stdlib",)),
            model=ModelConfig(dim=128, depth=4, heads=4, dim_head=32), seq_len=128, batch_size=16,
            max_steps=steps, eval={"every": max(1, steps // 6), "samples": 64}, save_every=max(1, steps // 6),
            keep_last=1, seed=c.seed, progress=c.progress, optim={"lr": 2e-3, "warmup": max(1, steps // 20)})
        trainer = PretrainTrainer(config).setup()
        try:
            summary = trainer.train()  # Ctrl-C: checkpoint saved, RunInterrupted (a KeyboardInterrupt) propagates
        finally:
            trainer.cleanup()
        return {"steps": steps, "val_loss": summary.get("val/loss"), "val_bpb": summary.get("val/bpb"),
                "parameters": trainer.model.num_parameters()}

    @torch.no_grad()
    def step_preferences(self, step_dir: Path) -> dict:
        c = self.config
        model, tokenizer = self._load_policy()
        model.eval()
        n = c.scaled(c.preference_prompts, minimum=32)
        prompts = self._prompts(tokenizer, n, seed=c.seed + 1)
        ids = [torch.tensor(tokenizer.encode(p)) for p in prompts]
        first, second = [], []
        for start in range(0, n, 64):  # both samples of a prompt in the same batch: one draw each
            chunk = ids[start:start + 64]
            sampling = SamplingConfig(max_new_tokens=c.response_tokens, temperature=1.0, seed=c.seed + 2 + start)
            out = generate(model, chunk + chunk, sampling)
            texts = [tokenizer.decode(row[:k].tolist()) for row, k in zip(out.tokens, out.lengths.tolist())]
            first += texts[:len(chunk)]
            second += texts[len(chunk):]
        annotate = rule_annotator()
        records = [r for r in (annotate(p, a, b) for p, a, b in zip(prompts, first, second)) if r is not None]
        if len(records) < 4:
            raise TrainingError(f"quickstart: only {len(records)} of {n} sampled pairs differ under the rule; "
                                "the policy samples too few distinct responses (raise --minutes or response_tokens)")
        n_val = min(max(16, len(records) // 10), len(records) // 2)
        write_preferences(step_dir / "train.jsonl", records[n_val:])
        write_preferences(step_dir / "val.jsonl", records[:n_val])
        return {"pairs": len(records), "ties_dropped": n - len(records), "train": len(records) - n_val, "val": n_val}

    def step_reward(self, step_dir: Path) -> dict:
        c = self.config
        steps = c.scaled(200, minimum=10)
        prefs = self.out / "preferences"
        config = RewardTrainConfig(model=str(self._pretrained()), data=str(prefs / "train.jsonl"),
                                   eval={"data": str(prefs / "val.jsonl"), "every": max(1, steps // 5)},
                                   out_dir=str(step_dir), max_steps=steps, batch_size=16, optim={"lr": 3e-3},
                                   save_every=max(1, steps // 5), keep_last=1, seed=c.seed, progress=c.progress)
        trainer = RewardTrainer(config).setup()
        try:
            trainer.train()
            metrics = trainer.validate()
        finally:
            trainer.cleanup()
        return {"steps": steps, "val_accuracy": metrics.get("accuracy"), "val_mean_margin": metrics.get("mean_margin")}

    def _rl_trainer(self, step_dir: Path):
        c = self.config
        model, tokenizer = self._load_policy()
        reward = RewardModel.from_pretrained(self.out / "reward" / "final", dropout=0.0).eval()
        prompts = self._prompts(tokenizer, 512, seed=c.seed + 3)
        common = dict(out_dir=str(step_dir), max_steps=c.scaled(40, minimum=2), max_new_tokens=c.response_tokens,
                      temperature=1.0, eos_token=None, optim={"lr": 1e-3}, seed=c.seed, save_every=5, keep_last=1,
                      sample_every=10, progress=c.progress)
        # The reward model's scores spread over about +-10 on this task, so the KL coefficients are
        # large: measured at 40 steps, PPO with kl_coef 0.05 and lr 3e-3 bought +18 reward for 59
        # nats/sequence of KL (vowel soup); 1.0 and 1e-3 keep it near 6 nats (0.25 nats/token).
        if c.algo == "ppo":
            config = PPOConfig(prompts_per_step=32, batch_size=16, epochs=2, kl_coef=1.0, critic_lr=3e-3, **common)
            cls = PPOTrainer
        else:
            config = GRPOConfig(prompts_per_step=8, group_size=4, batch_size=16, epochs=1, kl_coef=0.2, **common)
            cls = GRPOTrainer
        prompt_ids = [torch.tensor(tokenizer.encode(p)) for p in prompts]
        return cls(config, model=model, reward=reward, prompts=prompt_ids, tokenizer=tokenizer).setup(), tokenizer

    def step_rl(self, step_dir: Path) -> dict:
        trainer, _ = self._rl_trainer(step_dir)
        try:
            history = trainer.train()
        finally:
            trainer.cleanup()
        last = history[-1] if history else {}
        return {"steps": trainer.step_done, "adapter": str(self._adapter()),
                "last_reward_mean": last.get("reward_mean"), "last_kl_ref": last.get("kl_ref")}

    @torch.no_grad()
    def step_eval(self, step_dir: Path) -> dict:
        from ..model.checkpoint import load_adapter
        from .quickstart_report import write_report

        c = self.config
        trainer, tokenizer = self._rl_trainer(self.out / "eval" / "scratch")
        model, scope = trainer.model, trainer.actor_scope
        prompts = [torch.tensor(tokenizer.encode(p)) for p in self._prompts(tokenizer, c.eval_prompts, c.seed + 4)]
        sampling = SamplingConfig(max_new_tokens=c.response_tokens, temperature=1.0)
        rows = {}
        for label in ("before", "after"):
            if label == "after":
                load_adapter(model, self._adapter(), scope=scope)
            gen = torch.Generator().manual_seed(c.seed + 5)
            r = collect_rollout(trainer.scorer, prompts, sampling, trainer.reward, generator=gen)
            texts = [tokenizer.decode(strip_eos(t[:k], s).tolist())
                     for t, k, s in zip(r.responses, r.lengths.tolist(), r.stop_reasons)]
            kl = ((r.old_log_probs - r.ref_log_probs) * r.mask).sum(-1)
            rows[label] = {"reward_model": r.scores.mean().item(), "annotator_rule": sum(map(rule_score, texts)) / len(texts),
                           "kl_to_reference": kl.mean().item(),
                           "samples": [(tokenizer.decode(p.tolist()), t) for p, t in zip(prompts[:4], texts[:4])]}
        trainer.cleanup()
        return write_report(self.out, self.results, rows, self.config)


__all__ = ["QuickstartConfig", "Quickstart", "ALGOS", "STEPS"]
