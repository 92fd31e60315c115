"""The loop PPO and GRPO share: sample prompts, collect a rollout, prepare
advantages, a few epochs of minibatch updates, log, checkpoint.

Determinism: the prompts and the minibatch order of step s come from generators
seeded by (seed, s), and the sampling noise of each row from one seeded by
(seed, s, global row index), so a resumed run replays exactly
what an uninterrupted one would do; a checkpoint therefore holds the trainable
weights, the optimizer, the KL controller and the step, nothing else.
Under torchrun each rank collects its share of the prompts, whitening statistics
and loss normalisers are summed across ranks, and gradients are averaged.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ConfigError
from ..generation import SamplingConfig
from ..model.checkpoint import save_adapter
from ..model.lora import DEFAULT_LORA_ALPHA
from ..runtime.checkpoint import CheckpointManager
from ..runtime.distributed import all_reduce_sum, barrier
from ..runtime.metrics import MetricsLogger
from ..runtime.step import TrainStep
from ..rl.collect import collect_rollout, policy_temperature, strip_eos
from ..rl.kl import kl_per_token, negative_kl_is_significant
from ..rl.reference import Reference
from ..rl.rollout import Rollout, concat_rollouts

log = logging.getLogger(__name__)


@dataclass
class RLRunConfig:
    """Fields every RL run shares (see configs/rl/*.yaml for commented examples)."""

    model: str = ""                      # PaLM directory (save_pretrained); unused when a model is passed in
    actor_adapter: str | None = None     # optional adapter (e.g. SFT) loaded into the actor scope first
    prompts: str = ""                    # prompts file: .txt (one per line) or .jsonl with a "prompt" field
    tokenizer: str | None = None         # tokenizer directory; None = byte-level
    reward_model: str | None = None      # RewardModel directory
    reward_fn: str | None = None         # "package.module:function", called as fn(prompts, completions)
    reward_fn_weight: float = 1.0
    reward_model_weight: float = 1.0
    missing_eos_penalty: float = 0.0     # subtracted from responses that hit max_new_tokens
    out_dir: str = "runs/rl"
    steps: int = 100
    prompts_per_step: int = 16
    rollout_batch_size: int = 64         # rows generated together (a step's rows are collected in chunks)
    minibatch_size: int = 16             # rows per optimizer step (global, over all ranks)
    epochs: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    eos_token: int | None = 0
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"              # fp32 | bf16 (autocast) | fp16 (CUDA)
    lora_r: int = 8
    lora_alpha: float = DEFAULT_LORA_ALPHA  # LoRA output scale alpha / r: a learning rate transfers across ranks
    seed: int = 0
    sample_every: int = 10               # log a table of completions every N steps (0 = never)
    save_every: int = 0                  # checkpoint every N steps (0 = only at the end)
    keep_last: int = 2
    progress: bool = True                # a tqdm bar on stderr (main process only); false for logs

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "rollout_batch_size", "minibatch_size", "epochs",
                     "max_new_tokens", "lora_r"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0 for RL (a greedy policy has no "
                              f"log-probs to optimise)")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"max_grad_norm={self.max_grad_norm} must be > 0 or null (off)")


def seeded(seed: int, step: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2 ** 63))


def row_generators(seed: int, step: int, rows: range, device) -> list[torch.Generator]:
    """One generator per rollout row, seeded by (seed, step, global row index): a row's sample is
    the same whichever rank collects it and in whichever chunk, so N processes sample exactly
    what 1 process does."""
    base = (seed * 1_000_003 + step) * 1_000_033  # distinct (step, row) pairs for row < 1_000_033
    return [torch.Generator(device=device).manual_seed((base + r + (1 << 40)) % (2 ** 63)) for r in rows]


class DistInfo:
    def __init__(self):
        on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if on else 0
        self.world = dist.get_world_size() if on else 1

    @staticmethod
    def reduce_sum(t: Tensor) -> Tensor:
        return all_reduce_sum(t)


class RLTrainerBase:
    """Subclasses implement `_build`, `_prepare`, `_loss`, `_trainable_state`, `_load_trainable_state`."""

    name = "rl"

    def __init__(self, config: RLRunConfig, *, model=None, reward=None, prompts=None, tokenizer=None):
        self.config = config
        self.model, self.reward, self.prompt_list, self.tokenizer = model, reward, prompts, tokenizer
        self.dist = DistInfo()
        self.step_done = 0
        self.history: list[dict] = []
        self._first_length = None

    # ------------------------------------------------------------------ setup

    def setup(self) -> "RLTrainerBase":
        from .rl_setup import load_model, load_prompts, load_reward, load_tokenizer_for

        c = self.config
        torch.manual_seed(c.seed)
        self.tokenizer = self.tokenizer if self.tokenizer is not None else load_tokenizer_for(c)
        if self.model is None:
            self.model = load_model(c)
        self.prompt_list = load_prompts(self.prompt_list if self.prompt_list is not None else c.prompts,
                                        self.tokenizer)
        self.reward = load_reward(self.reward, c, self.tokenizer)
        self.sampling = SamplingConfig(max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                                       eos_token=c.eos_token)
        self.temperature = policy_temperature(self.sampling)
        self._build()  # adds the actor (and critic) scopes, loads actor_adapter
        self.reference = Reference(self.model, self.actor_scope)
        self.params = [p for p in self._parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=c.lr, weight_decay=c.weight_decay)
        self.stepper = TrainStep(self.model, self.optimizer, clip_grad_norm=c.max_grad_norm or 0.0,
                                 precision=c.precision)
        self.out_dir = Path(c.out_dir)
        self.checkpoints = CheckpointManager(self.out_dir, keep_last=c.keep_last, is_main=self.dist.rank == 0)
        self._maybe_resume()
        self.metrics = MetricsLogger(self.out_dir, is_main=self.dist.rank == 0,
                                     resume_step=self.step_done if self.step_done else None)
        return self

    # ------------------------------------------------------------------ loop

    def rows_per_step(self) -> int:
        return self.config.prompts_per_step

    def _prompts_for(self, step: int) -> list[Tensor]:
        g = seeded(self.config.seed, step, 1)
        idx = torch.randint(len(self.prompt_list), (self.config.prompts_per_step,), generator=g)
        rows = [self.prompt_list[i] for i in idx.tolist()]
        rows = self._expand_prompts(rows)  # GRPO repeats each prompt G times
        # contiguous shares: rank r takes rows r*k .. r*k+k-1 (whole GRPO groups when G divides k)
        share = len(rows) // self.dist.world
        return rows[self.dist.rank * share:(self.dist.rank + 1) * share]

    def _expand_prompts(self, rows):
        return rows

    def train(self) -> list[dict]:
        from tqdm import tqdm

        c = self.config
        bar = tqdm(total=c.steps, initial=self.step_done, desc=self.name, dynamic_ncols=True,
                   disable=not (c.progress and self.dist.rank == 0))
        try:
            for step in range(self.step_done, c.steps):
                metrics = self.train_step(step)
                self.history.append(metrics)
                self._write_metrics(metrics)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.4f}", kl=f"{metrics['kl_ref']:.4f}",
                                s_step=f"{metrics['seconds_generation'] + metrics['seconds_learning']:.2f}")
                if c.save_every and (step + 1) % c.save_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
        if c.save_every == 0 or c.steps % c.save_every:
            self.save_checkpoint()
        self.export()
        # rank 0 writes the last checkpoint and the adapter; no rank may tear the process group
        # down while it does (a rank that did so early aborted at exit now and then)
        barrier()
        return self.history

    def export(self):
        """Write the trained actor adapter to OUT/actor.safetensors (load with load_adapter)."""
        if self.dist.rank != 0 or self.actor_scope is None:
            return None
        return save_adapter(self.model, self.actor_scope, self.out_dir / "actor.safetensors")

    def train_step(self, step: int) -> dict:
        c = self.config
        t0 = time.perf_counter()
        rows = self._prompts_for(step)
        first = self.dist.rank * len(rows)  # global index of this rank's first row
        gens = row_generators(c.seed, step, range(first, first + len(rows)), self.model.token_emb.weight.device)
        chunk = c.rollout_batch_size
        rollout = concat_rollouts([
            collect_rollout(self.model, rows[i:i + chunk], self.sampling, self.reward, self.reference,
                            actor_scope=self.actor_scope, actor_critic=self._critic(), generator=gens[i:i + chunk])
            for i in range(0, len(rows), chunk)])
        t1 = time.perf_counter()
        metrics = {"step": step + 1, **self._rollout_metrics(rollout, step)}
        metrics.update(self._prepare(rollout))
        metrics.update(self._learn(rollout, step))
        metrics["seconds_generation"] = t1 - t0
        metrics["seconds_learning"] = time.perf_counter() - t1
        self.step_done = step + 1
        if c.sample_every and (step + 1) % c.sample_every == 0 and self.dist.rank == 0:
            table = self.sample_table(rollout)
            log.info("step %d samples:\n%s", step + 1, table)
            if getattr(self, "metrics", None) is not None:
                self.metrics.log_text(step + 1, "samples", table)
        return metrics

    def _learn(self, rollout: Rollout, step: int) -> dict:
        """`epochs` passes over the rollout in minibatches; each minibatch is one `TrainStep`, which
        weights every rank's loss by its token (or sequence) count, so ranks and minibatches of
        uneven sizes give exactly the mean over the global minibatch."""
        c = self.config
        n = len(rollout)
        local_mb = max(1, c.minibatch_size // self.dist.world)
        sums: dict[str, float] = {}
        count = 0
        self.model.train()
        for epoch in range(c.epochs):
            order = torch.randperm(n, generator=seeded(c.seed, step * 131 + epoch, 3))
            for start in range(0, n, local_mb):
                mb = rollout.select(order[start:start + local_mb])
                captured = {}

                def loss_fn(batch):
                    loss, stats = self._loss(batch)
                    captured.update(stats)
                    return loss, self._weight(batch)

                result = self.stepper(loss_fn, [mb], step=step + 1)
                captured.pop("tokens", None)
                # the statistics are token means: weighting each rank's by its token count gives the
                # global minibatch's values
                keys = sorted(captured)
                w = float(mb.mask.sum())
                local = torch.tensor([float(captured[k]) * w for k in keys] + [w], dtype=torch.float64,
                                     device=self.model.token_emb.weight.device)
                reduced = self.dist.reduce_sum(local).tolist()
                for k, v in zip(keys, reduced[:-1]):
                    sums[k] = sums.get(k, 0.0) + v / max(reduced[-1], 1e-12)
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + result.grad_norm  # already global
                count += 1
        return {k: v / max(count, 1) for k, v in sums.items()}

    def _weight(self, mb: Rollout) -> float:
        """How many units the minibatch's mean loss is over (tokens for a token mean)."""
        return float(mb.mask.sum())

    # ------------------------------------------------------------------ observability

    def _rollout_metrics(self, rollout: Rollout, step: int) -> dict:
        mask = rollout.mask
        kl_tok = kl_per_token(rollout.old_log_probs, rollout.ref_log_probs, "k1").masked_fill(~mask, 0.0)
        lengths = rollout.lengths.float()
        eos = torch.tensor([r == "eos" for r in rollout.stop_reasons], dtype=torch.float32)
        stats = torch.stack([rollout.scores.float().sum().cpu(), (rollout.scores.float() ** 2).sum().cpu(),
                             kl_tok.sum(-1).sum().cpu(), lengths.sum().cpu(), eos.sum(),
                             torch.tensor(float(len(rollout)))]).double()
        s, s2, kl, ln, e, n = self.dist.reduce_sum(stats).tolist()
        mean = s / n
        out = {"reward_mean": mean, "reward_std": max(s2 / n - mean * mean, 0.0) ** 0.5, "kl_ref": kl / n,
               "response_length": ln / n, "eos_rate": e / n}
        if negative_kl_is_significant(kl_tok, mask):
            log.warning("step %d: KL to the reference is negative beyond noise (%.4f per sequence); the policy "
                        "and reference log-probs disagree (temperature or mask mismatch?)", step + 1, kl / n)
        if self._first_length is None:
            self._first_length = out["response_length"]
        elif out["response_length"] < max(1.5, 0.25 * self._first_length):
            log.warning("step %d: responses collapsed to %.1f tokens (%.1f at the start); the policy may be "
                        "gaming the reward or the KL penalty", step + 1, out["response_length"], self._first_length)
        return out

    def sample_table(self, rollout: Rollout, rows: int = 4) -> str:
        lines = ["| reward | prompt | completion |", "| --- | --- | --- |"]
        for i in range(min(rows, len(rollout))):
            p = rollout.prompts[i, : int(rollout.prompt_lengths[i])].tolist()
            r = strip_eos(rollout.responses[i, : int(rollout.lengths[i])], rollout.stop_reasons[i]).tolist()
            dec = (lambda t: self.tokenizer.decode(t)) if self.tokenizer is not None else str
            text = [dec(p).replace("|", "\\|").replace("\n", " "), dec(r).replace("|", "\\|").replace("\n", " ")]
            lines.append(f"| {float(rollout.scores[i]):.3f} | {text[0]} | {text[1]} |")
        return "\n".join(lines)

    def _write_metrics(self, metrics: dict) -> None:
        if getattr(self, "metrics", None) is not None:
            self.metrics.log(metrics["step"], {k: v for k, v in metrics.items() if k != "step"})
        if self.dist.rank == 0:
            log.info("%s step %d: reward %.4f kl %.4f len %.1f", self.name, metrics["step"], metrics["reward_mean"],
                     metrics["kl_ref"], metrics["response_length"])

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Trainable weights, optimizer, KL controller (PPO), step. Rollout randomness is a function of
        (seed, step, row), so no RNG state is needed for an exact resume."""
        return {"step": self.step_done, "trainable": self._trainable_state(),
                "optimizer": self.optimizer.state_dict(), "stepper": self.stepper.state_dict(),
                "extra": self._extra_state(), "config": json.dumps(asdict(self.config))}

    def save_checkpoint(self) -> Path | None:
        return self.checkpoints.save(self.step_done, self.state_dict())

    def _maybe_resume(self) -> None:
        if self.checkpoints.latest() is None:
            return
        state = self.checkpoints.load()
        self._load_trainable_state(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.stepper.load_state_dict(state["stepper"])
        self._load_extra_state(state["extra"])
        self.step_done = int(state["step"])
        log.info("resumed %s from %s at step %d", self.name, state["dir"], self.step_done)

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def _critic(self):
        return None

    def _param_groups(self):
        return [{"params": self.params}]

    def cleanup(self) -> None:
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
