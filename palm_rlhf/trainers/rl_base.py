"""The step PPO and GRPO share: sample prompts, collect a rollout, prepare advantages, a few
epochs of minibatch updates. The run around it (signals, checkpoints, resume, metrics, final/)
is `palm_rlhf.runtime.run.Run`; `start_policy` is what PPO, GRPO and DPO start from.

Determinism: the prompts and the minibatch order of step s come from generators
seeded by (seed, s), and the sampling noise of each row from one seeded by
(seed, s, global row index), so a resumed run replays exactly
what an uninterrupted one would do; a checkpoint holds the trainable weights, the
optimizer, the KL controller, the step and RNG states (and, for use, the merged model).
Under torchrun each rank collects its share of the prompts, whitening statistics
and loss normalisers are summed across ranks, and gradients are averaged: by DDP over the trained
parameters (`distributed=ddp`), or by FSDP2 with the model sharded by block (`distributed=fsdp`;
the reference, being the same model with the actor scope off or a frozen sibling scope, is
sharded with it). Under FSDP the rollout is collected with the model unsharded
(`runtime.fsdp.gathered`: generation stops at a different step on each rank), the learning
forwards run sharded, and checkpoints and final/ hold full tensors gathered onto rank 0.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from ..data.chat import template_for
from ..errors import ConfigError
from ..data.sampling import seeded
from ..generation import SamplingConfig
from ..generation.scoring import Scorer
from ..runtime import fsdp
from ..runtime.budget import Budget, check_budget
from ..runtime.distributed import all_reduce_sum
from ..runtime.optim import OptimConfig, build_optimizer, build_scheduler
from ..runtime.resolve import resolve_model
from ..runtime.run import MergedAdapter, OnRun, Run, RunSettings
from ..runtime.vocab import (OPTIM_ALIASES, LoraConfig, check_batch_keys, check_distributed, lora_kwargs,
                             micro_batches_per_step)
from ..rl.collect import collect_rollout, policy_temperature, strip_eos
from ..rl.kl import kl_per_token, negative_kl_is_significant
from ..rl.reference import Reference
from ..rl.rollout import Rollout, concat_rollouts

log = logging.getLogger(__name__)


@dataclass
class RLRunConfig(RunSettings):
    """Fields every RL run shares (see configs/rl/*.yaml for commented examples)."""

    ALIASES: ClassVar[dict] = {**OPTIM_ALIASES, "steps": "max_steps", "minibatch_size": "batch_size",
                               "lora_r": "lora.r", "lora_alpha": "lora.alpha", "actor_scope": "lora.scope"}

    out_dir: str = "runs/rl"
    model: str = ""                      # the starting PaLM: a run directory (its final/), a final/ or checkpoint dir
    actor_adapter: str | None = None     # optional adapter (e.g. SFT) loaded into the actor scope first
    prompts: str = ""                    # prompts file: .txt (one per line) or .jsonl with a "prompt" field
    tokenizer: str | None = None         # None: the tokenizer saved with `model`
    reward_model: str | None = None      # RewardModel directory
    reward_fn: str | None = None         # "package.module:function", called as fn(prompts, completions)
    reward_fn_weight: float = 1.0    # weight of reward_fn in the summed reward
    reward_model_weight: float = 1.0  # weight of reward_model in the summed reward
    missing_eos_penalty: float = 0.0     # subtracted from responses that hit max_new_tokens
    prompts_per_step: int = 16           # a multiple of the number of processes
    rollout_batch_size: int = 64         # rows generated together (a step's rows are collected in chunks)
    batch_size: int = 16                 # rollout rows per optimizer step, over all processes
    micro_batch_size: int = 0            # rows per process per forward (accumulation); 0: batch_size / processes
    epochs: int = 1                  # passes over each step's rollouts
    max_new_tokens: int = 64         # tokens generated per rollout
    temperature: float = 1.0         # sampling temperature of rollouts (the policy optimised)
    eos_token: int | None = None         # None: the tokenizer's EOS id
    precision: str = "fp32"              # fp32 | bf16 (autocast) | fp16 (CUDA)
    distributed: str = "ddp"             # ddp | fsdp (FSDP2 fully_shard by block), used under torchrun
    sample_every: int = 10               # log a table of completions every N steps (0 = never)
    kl_budget: float | None = None       # nats/sequence: warn when a step's kl_ref passes it (null: no budget)
    stop_at_kl_budget: bool = False      # stop at the first kl_ref over kl_budget; final/: the last policy within it
    # RL's optimizer steps are minibatches: optim.warmup counts them; the default is a constant lr
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999),
                                                                   warmup=0, schedule="constant"))
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(scope="actor"))

    def __post_init__(self):
        super().__post_init__()
        for name in ("prompts_per_step", "rollout_batch_size", "epochs", "max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        check_batch_keys(self.batch_size, self.micro_batch_size)
        check_distributed(self.distributed)
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0 for RL (a greedy policy has no "
                              f"log-probs to optimise)")
        if not self.lora.enabled:
            raise ConfigError("lora.r=0: RL trains a LoRA actor scope against the base as its reference; "
                              "set lora.r >= 1")
        check_budget(self.kl_budget, self.stop_at_kl_budget)


def row_generators(seed: int, step: int, rows: range, device) -> list[torch.Generator]:
    """One generator per rollout row, seeded by (seed, step, global row index): a row's sample is
    the same whichever rank collects it and in whichever chunk, so N processes sample exactly
    what 1 process does."""
    base = (seed * 1_000_003 + step) * 1_000_033  # distinct (step, row) pairs for row < 1_000_033
    return [torch.Generator(device=device).manual_seed((base + r + (1 << 40)) % (2 ** 63)) for r in rows]


def start_policy(trainer) -> None:
    """What every preference-learning trainer (PPO, GRPO, DPO) starts from: `model=` and the tokenizer
    that follows it unless objects were passed in, on this run's device, learning with dropout off
    (the old and reference log-probs are taken without it, so dropout would bias the ratio and KL)."""
    from .rl_setup import check_tokenizer, load_start

    c = trainer.config
    if trainer.model is None:
        model, tokenizer = load_start(c.model, c.tokenizer)
        trainer.model = model
        trainer.tokenizer = trainer.tokenizer if trainer.tokenizer is not None else tokenizer
    elif trainer.tokenizer is None and (c.model or c.tokenizer):
        from ..runtime.resolve import load_tokenizer_for

        trainer.tokenizer = load_tokenizer_for(resolve_model(c.model) if c.model else None, c.tokenizer)
    check_tokenizer(trainer.tokenizer, trainer.model, where=f"model={c.model or 'the model passed in'}")
    trainer.model.to(trainer.env.device).set_dropout(0.0)


def eos_token(config, tokenizer) -> int | None:
    """eos_token=None means the tokenizer's EOS."""
    if config.eos_token is not None:
        return config.eos_token
    return getattr(tokenizer, "eos_id", None)


def stop_ids(config, tokenizer):
    """What ends a rollout: eos_token when set, else every stop id of the tokenizer (a Hugging Face
    checkpoint's EOS and generation_config.json's eos_token_id list)."""
    ids = getattr(tokenizer, "eos_ids", None) if config.eos_token is None else None
    return list(ids) if ids else eos_token(config, tokenizer)


class RLTrainerBase(OnRun):
    """Subclasses implement `_build`, `_prepare`, `_loss`, `_trainable_state`, `_load_trainable_state`.
    `_loss(mb)` scores the minibatch with `self.scorer` and hands the tensors to a loss of `palm_rlhf.rl`."""

    name = "rl"
    postfix = ("reward_mean", "kl_ref")

    def __init__(self, config: RLRunConfig, *, model=None, reward=None, prompts=None, tokenizer=None):
        self.config = config
        self.model, self.reward, self.prompt_list, self.tokenizer = model, reward, prompts, tokenizer
        self.run = Run(config, self.name)
        self._first_length = None
        self.sharded = False  # FSDP (distributed=fsdp under torchrun), decided in setup
        self.sharded_rewards: list = []  # the reward models sharded with it

    # ------------------------------------------------------------------ setup

    def setup(self) -> "RLTrainerBase":
        from .rl_setup import load_prompts, load_reward

        c = self.config
        self.run.open()
        self.run.check_divides("prompts_per_step", c.prompts_per_step)
        self.micro, self.accum = micro_batches_per_step(c.batch_size, c.micro_batch_size, self.env.world_size)
        rows = len(self._expand_prompts([None] * c.prompts_per_step))  # rollout rows per step, all processes
        if self.accum > 1 and rows % c.batch_size:
            raise ConfigError(f"micro_batch_size={c.micro_batch_size} accumulates over batch_size={c.batch_size} "
                              f"rows, which must divide the {rows} rollout rows of a step")
        start_policy(self)
        # chat prompts render with the model's template (its Jinja one, chat_template.json, or ours)
        template = template_for(self.tokenizer, resolve_model(c.model).model_dir if c.model else None)
        self.prompt_list = load_prompts(self.prompt_list if self.prompt_list is not None else c.prompts,
                                        self.tokenizer, template)
        self.reward = load_reward(self.reward, c, self.tokenizer)
        self.sampling = SamplingConfig(max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                                       eos_token=stop_ids(c, self.tokenizer))
        self.temperature = policy_temperature(self.sampling)
        self._build()  # adds the actor (and critic) scopes, loads actor_adapter
        self.reference = Reference(self.model, self.actor_scope)
        self.sharded = self._shard()
        # the one model forward of this run: old/reference log-probs and values at collection, and the
        # log-probs (entropy, values) each loss reads under the current weights
        self.scorer = Scorer(self.model, self.actor_scope, temperature=self.temperature, reference=self.reference,
                             critic=self._critic())
        self.params = [p for p in self._parameters() if p.requires_grad]
        self.optimizer = build_optimizer([(str(i), p) for i, p in enumerate(self.params)], c.optim,
                                         lr_of=self._lr_of())
        # the schedule runs over optimizer steps: epochs x minibatches of every RL step
        updates = c.max_steps * c.epochs * math.ceil(rows / c.batch_size)
        self.scheduler = build_scheduler(self.optimizer, c.optim, updates)
        self.run.stepper(self.model, self.optimizer, self.scheduler, grad_accum=self.accum,
                         clip_grad_norm=c.optim.max_grad_norm, precision=c.precision)
        self.budget = Budget(self.name, "kl_ref", c.kl_budget, c.stop_at_kl_budget, log=log,
                             snapshot=lambda: {k: v.detach().clone() for k, v in self._trainable_state().items()},
                             restore=self._load_trainable_state,
                             advice="lower optim.lr or max_steps, raise kl_coef",
                             untrained_advice=f"lower optim.lr ({c.optim.lr:g}), raise kl_coef")
        self.budget.begin()
        self.run.start(self)
        return self

    def _shard(self) -> bool:
        """distributed=fsdp under torchrun: shard the policy (its frozen base, the reference, the
        LoRA scopes) by block, each module of `_sharded_modules` (PPO's value head), and the frozen
        reward models (every rank scores as many rows, in as many forwards, so they stay sharded
        while the rollout is collected)."""
        from .rl_setup import reward_models

        if self.env.world_size == 1 or self.config.distributed != "fsdp":
            return False
        fsdp.shard(self.model, fsdp.PALM_METHODS)
        for module in self._sharded_modules():
            fsdp.shard(module)
        self.sharded_rewards = reward_models(self.reward)
        for model in self.sharded_rewards:
            if not fsdp.is_sharded(model):
                fsdp.shard(model.to(self.env.device))
        return True

    def _sharded_modules(self) -> list:
        """Trained modules beside the policy model, sharded (and gathered) with it."""
        return []

    def _reshard(self) -> None:
        """Back to the sharded parameters (a no-grad forward leaves the root unit gathered)."""
        for module in (self.model, *self._sharded_modules()):
            fsdp.reshard(module)

    def _gathered(self):
        """The context the rollout is collected in: under FSDP every unit unsharded on every rank."""
        return fsdp.gathered(self.model, *self._sharded_modules())

    @property
    def stop_requested(self) -> bool:
        """Past kl_budget with stop_at_kl_budget (Run.train stops; final/ keeps the last step within it)."""
        return self.budget.stop_requested

    # ------------------------------------------------------------------ loop

    def rows_per_step(self) -> int:
        return self.config.prompts_per_step

    def _prompts_for(self, step: int) -> list[Tensor]:
        g = seeded(self.config.seed, step, 1)
        idx = torch.randint(len(self.prompt_list), (self.config.prompts_per_step,), generator=g)
        rows = [self.prompt_list[i] for i in idx.tolist()]
        rows = self._expand_prompts(rows)  # GRPO repeats each prompt G times
        # contiguous shares: rank r takes rows r*k .. r*k+k-1 (whole GRPO groups: prompts_per_step % world == 0)
        share = len(rows) // self.env.world_size
        return rows[self.env.rank * share:(self.env.rank + 1) * share]

    def _expand_prompts(self, rows):
        return rows

    def train(self) -> list[dict]:
        return self.run.train(self)

    def train_step(self, step: int) -> dict:
        c = self.config
        t0 = time.perf_counter()
        rows = self._prompts_for(step)
        first = self.env.rank * len(rows)  # global index of this rank's first row
        gens = row_generators(c.seed, step, range(first, first + len(rows)), self.model.token_emb.weight.device)
        chunk = c.rollout_batch_size
        with self._gathered():  # FSDP: a rank's generation stops when its own rows are done
            rollout = concat_rollouts([
                collect_rollout(self.scorer, rows[i:i + chunk], self.sampling, self.reward,
                                generator=gens[i:i + chunk]) for i in range(0, len(rows), chunk)])
        for model in self.sharded_rewards:  # a no-grad forward leaves the root unit gathered
            fsdp.reshard(model)
        t1 = time.perf_counter()
        metrics = self._rollout_metrics(rollout, step)
        # kl_ref measures the policy that collected the rollouts: the one after `step` updates
        metrics.update(self.budget.measure(step, metrics["kl_ref"], row=step + 1))
        metrics.update(self._prepare(rollout))
        metrics.update(self._learn(rollout, step))
        metrics["seconds_generation"] = t1 - t0
        metrics["seconds_learning"] = time.perf_counter() - t1
        if self.run.is_main:
            log.info("%s step %d: reward %.4f kl %.4f len %.1f", self.name, step + 1, metrics["reward_mean"],
                     metrics["kl_ref"], metrics["response_length"])
        if c.sample_every and (step + 1) % c.sample_every == 0 and self.run.is_main:
            table = self.sample_table(rollout)
            log.info("step %d samples:\n%s", step + 1, table)
            self.run.metrics.log_text(step + 1, "samples", table)
        return metrics

    def _learn(self, rollout: Rollout, step: int) -> dict:
        """`epochs` passes over the rollout in minibatches; each minibatch is one `TrainStep`, which
        weights every rank's loss by its token (or sequence) count, so ranks and minibatches of
        uneven sizes give exactly the mean over the global minibatch."""
        c = self.config
        n = len(rollout)
        local_mb = self.micro * self.accum  # this process's rows of one optimizer step
        sums: dict[str, float] = {}
        count = 0
        self.model.train()
        for epoch in range(c.epochs):
            order = self._row_order(n, seeded(c.seed, step * 131 + epoch, 3))
            for start in range(0, n, local_mb):
                rows = order[start:start + local_mb]
                mb = rollout.select(rows)
                parts = []

                def loss_fn(batch):
                    loss, stats = self._loss(batch)
                    parts.append((stats, float(batch.mask.sum())))
                    return loss, self._weight(batch)

                micro = [rollout.select(part) for part in rows.split(self.micro)]
                result = self.run.optimizer_step(loss_fn, micro)
                captured = dict(parts[0][0]) if len(parts) == 1 else {  # token means over the micro-batches
                    k: sum(float(st[k]) * w for st, w in parts) / max(sum(w for _, w in parts), 1e-12)
                    for k in parts[0][0]}
                captured.pop("tokens", None)
                # the statistics are token means: weighting each rank's by its token count gives the
                # global minibatch's values
                keys = sorted(captured)
                w = float(mb.mask.sum())
                local = torch.tensor([float(captured[k]) * w for k in keys] + [w], dtype=torch.float64,
                                     device=self.model.token_emb.weight.device)
                reduced = all_reduce_sum(local).tolist()
                for k, v in zip(keys, reduced[:-1]):
                    sums[k] = sums.get(k, 0.0) + v / max(reduced[-1], 1e-12)
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + result.grad_norm  # already global
                sums["lr"] = sums.get("lr", 0.0) + result.lr  # the actor's, averaged over the step's updates
                count += 1
        return {k: v / max(count, 1) for k, v in sums.items()}

    def _row_order(self, n: int, generator: torch.Generator) -> Tensor:
        """The order in which an epoch visits the rollout's rows (minibatches are consecutive slices)."""
        return torch.randperm(n, generator=generator)

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
        s, s2, kl, ln, e, n = all_reduce_sum(stats).tolist()
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

    # ------------------------------------------------------------------ what a checkpoint holds

    def state_dict(self) -> dict:
        """Trainable weights, optimizer, KL controller (PPO). Rollout randomness is a function of
        (seed, step, row), so the RNG states the run saves are all it needs for an exact resume."""
        if not self.sharded:
            return {"trainable": self._trainable_state(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "extra": self._extra_state(), **self.budget.state_dict()}
        # FSDP: full tensors (gathered on every rank), so the checkpoint loads into any number of processes
        self._reshard()
        return {"trainable": fsdp.full_tensors(self._trainable_state()),
                "optimizer": fsdp.full_optimizer_state(self.optimizer), "scheduler": self.scheduler.state_dict(),
                "extra": self._extra_state(), **fsdp.full_budget_state(self.budget.state_dict())}

    def load_state_dict(self, state: dict, directory: Path) -> None:
        if self.sharded:  # full tensors in, this rank's shards kept
            self._reshard()
            live = self._trainable_state()
            state = {**fsdp.budget_state_like(state, live), "trainable": fsdp.shard_like(state["trainable"], live)}
            self._load_trainable_state(state["trainable"])
            fsdp.load_full_optimizer_state(self.optimizer, state["optimizer"])
        else:
            self._load_trainable_state(state["trainable"])
            self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:  # checkpoints written before RL had a schedule have none
            self.scheduler.load_state_dict(state["scheduler"])
        self._load_extra_state(state["extra"])
        self.budget.load_state_dict(state)

    def saveable(self, final: bool = False):
        """The base with the actor merged + adapter.safetensors (checkpoints and final/ alike); at a stop
        over kl_budget, final/ holds the last policy measured within it."""
        if final:
            self.budget.roll_back(self.step)
        if self.sharded:  # every rank gathers; rank 0 merges and writes a plain copy
            model = fsdp.gathered_copy(self.model, self.is_main)
            return MergedAdapter(model, self.actor_scope) if model is not None else None
        return MergedAdapter(self.model, self.actor_scope)

    def final_record(self) -> dict:
        return {"scope": self.actor_scope, "actor_adapter": self.config.actor_adapter,
                "policy_step": self.budget.final_step(self.step)}

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def _critic(self):
        return None

    def _lr_of(self):
        """A per-parameter peak lr (`build_optimizer`'s lr_of), or None: optim.lr for all."""
        return None

    def _lora_options(self) -> dict:
        """lora.targets / lora.dropout for add_finetune_params (where the model takes them)."""
        return lora_kwargs(self.model.add_finetune_params, self.config.lora)

    def cleanup(self) -> None:
        self.run.close()
