"""Reward-model training: `palm-rlhf reward train --config PRESET model=RUN data=FILE.jsonl`.

Pairwise records train with the Bradley-Terry loss, rating records with binned cross-entropy
or MSE. The loop is thin: batches come from `reward_data` (a pure function of the step, so
resume is exact); the run itself (out_dir, signals, checkpoints, resume, metrics, final/) is
`palm_rlhf.runtime.run`, THE optimizer step and the optimizer and schedule `palm_rlhf.runtime`.
Under torchrun, `distributed=fsdp` shards the reward model by block with FSDP2 (its head, prompt and
response embeddings and LoRA scope sit in the root unit); checkpoints and final/ hold the full
model gathered onto rank 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar


from ..data.preferences import read_preferences
from ..errors import CheckpointError, ConfigError, DataError
from ..model.reward import POOLINGS, RewardModel
from ..data.sampling import split_heldout, stream_indices
from ..runtime import fsdp
from ..runtime.optim import OptimConfig, build_optimizer, build_scheduler
from ..runtime.run import OnRun, Run, RunSettings
from ..runtime.step import PRECISIONS, StepResult
from ..runtime.vocab import (BATCH_ALIASES, EVAL_ALIASES, LORA_ALIASES, OPTIM_ALIASES, EvalConfig, LoraConfig,
                             check_batch_keys, check_distributed, lora_kwargs, micro_batches_per_step,
                             step_positions)
from .reward_data import encode_records, evaluate, make_batch, record_kind, reward_loss
from .rl_setup import check_tokenizer, load_start

log = logging.getLogger(__name__)

OBJECTIVES = ("auto", "pairwise", "binned", "mse")
# fields that decide which records each step sees: changing them on resume changes the data order
_DATA_FIELDS = ("data", "eval.data", "eval.fraction", "batch_size", "seed")


@dataclass
class RewardTrainConfig(RunSettings):
    ALIASES: ClassVar[dict] = {**OPTIM_ALIASES, **LORA_ALIASES, **EVAL_ALIASES, **BATCH_ALIASES, "base": "model"}

    out_dir: str = "runs/reward"
    max_steps: int = 300
    save_every: int = 100
    log_every: int = 10
    model: str = ""                # the starting PaLM: a run directory (its final/), a final/ or checkpoint directory
    tokenizer: str | None = None   # None: the tokenizer saved with `model`
    data: str = ""                 # preference JSONL (palm_rlhf.data.preferences)
    objective: str = "auto"        # auto: pairwise for pairwise records, binned for ratings
    num_bins: int = 5              # binned head: ratings are whole numbers in [0, num_bins - 1]
    pooling: str = "response_mean"  # response_mean | last | response_mean_last | mean | sequence_classification
    dropout: float = 0.0             # dropout in the reward model
    use_margin: bool = True        # subtract each record's margin inside the Bradley-Terry loss
    max_len: int = 256               # prompt + response tokens per record (prompt cut from the left)
    batch_size: int = 16           # examples per optimizer step, over all processes
    micro_batch_size: int = 0      # examples per process per forward (accumulation); 0: batch_size / processes
    precision: str = "fp32"        # fp32 | bf16 (autocast, CPU or CUDA) | fp16 (CUDA, with a grad scaler)
    distributed: str = "ddp"       # ddp | fsdp (FSDP2 fully_shard by block), used under torchrun
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0, warmup=10))
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(every=50, fraction=0.1))

    def __post_init__(self):
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective={self.objective!r}: use one of {', '.join(OBJECTIVES)}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling={self.pooling!r}: use one of {', '.join(POOLINGS)}")
        check_batch_keys(self.batch_size, self.micro_batch_size)
        check_distributed(self.distributed)
        if isinstance(self.max_len, bool) or not isinstance(self.max_len, int) or self.max_len <= 0:
            raise ConfigError(f"max_len={self.max_len!r}: must be a positive integer")
        if self.num_bins < 2:
            raise ConfigError(f"num_bins={self.num_bins!r}: a binned head needs at least 2 bins")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout!r}: must be in [0, 1)")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}: use one of {', '.join(PRECISIONS)}")


class RewardTrainer(OnRun):
    """setup() -> train() -> cleanup(). One process, or one per device under torchrun."""

    name = "reward"
    postfix = ("train/loss",)

    def __init__(self, config: RewardTrainConfig, tokenizer=None):
        self.config = config
        self.tokenizer = tokenizer
        self.run = Run(config, self.name)
        self.metrics_: dict = {}
        self.sharded = False  # FSDP (distributed=fsdp under torchrun), decided in setup

    # ------------------------------------------------------------------ setup

    def setup(self) -> "RewardTrainer":
        c = self.config
        if not c.model:
            raise ConfigError("model is not set; pass model=RUN_DIR (a run, final/ or save_pretrained directory)")
        if not c.data:
            raise ConfigError("data is not set; pass data=FILE.jsonl")
        self.run.open()
        self.micro, self.accum = micro_batches_per_step(c.batch_size, c.micro_batch_size, self.env.world_size)
        records = read_preferences(c.data)
        kind = record_kind(records, c.data)
        objective = c.objective
        if objective == "auto":
            objective = "pairwise" if kind == "pairwise" else "binned"
        if (objective == "pairwise") != (kind == "pairwise"):
            raise ConfigError(f"objective={c.objective!r} does not fit {c.data}, which holds {kind} records; "
                              f"use objective=pairwise for pairs, binned or mse for ratings")
        self.objective = objective
        if objective == "binned":
            for i, r in enumerate(records):
                if r.rating != int(r.rating) or not 0 <= r.rating < c.num_bins:
                    raise DataError(f"{c.data}: record {i + 1} has rating {r.rating!r}; the binned objective "
                                    f"needs whole ratings in [0, {c.num_bins - 1}] (set num_bins, or objective=mse)")
        if c.eval.data:
            val_records = read_preferences(c.eval.data)
            if record_kind(val_records, c.eval.data) != kind:
                raise DataError(f"{c.eval.data} holds different records than {c.data}; use the same kind")
            train_records = records
        else:
            train_records, val_records = split_heldout(records, c.eval.fraction, c.seed)
        if c.eval.samples:
            val_records = val_records[:c.eval.samples]

        palm, tokenizer = load_start(c.model, c.tokenizer)
        if self.tokenizer is None:
            self.tokenizer = tokenizer
        check_tokenizer(self.tokenizer, palm, where=f"model={c.model}")
        self.train_data = encode_records(train_records, self.tokenizer)
        self.val_data = encode_records(val_records, self.tokenizer) if val_records else None

        use_lora = c.lora.enabled
        self.model = RewardModel(palm, dropout=c.dropout, num_binned_output=c.num_bins if objective == "binned" else 0,
                                 use_lora=use_lora, lora_r=c.lora.r if use_lora else 8, pooling=c.pooling,
                                 lora_alpha=c.lora.alpha, reward_lora_scope=c.lora.scope or "reward",
                                 lora_options=lora_kwargs(palm.add_finetune_params, c.lora) if use_lora else None
                                 ).to(self.env.device)
        del palm
        # freeze what does not train (a full finetune trains every weight), so backward skips the rest
        trainable = {id(p) for p in self.model.finetune_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in trainable)
        self.sharded = self.env.world_size > 1 and c.distributed == "fsdp"
        if self.sharded:  # before the optimizer, which must hold the sharded parameters
            latest = self.run.resume_point()
            if latest is not None:  # weights before sharding: FSDP shards what it is given
                self.model.load_state_dict(RewardModel.from_pretrained(latest).state_dict())
            fsdp.shard(self.model, ("head",))
        self.optimizer = build_optimizer(self.model, c.optim)
        self.scheduler = build_scheduler(self.optimizer, c.optim, c.max_steps)
        self.run.stepper(self.model, self.optimizer, self.scheduler, grad_accum=self.accum,
                         clip_grad_norm=c.optim.max_grad_norm, precision=c.precision)
        self.run.start(self)
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("reward training: %d %s records (%d held out), objective %s, %s, %d trainable parameters, "
                 "%d process(es) on %s, %s", len(self.train_data), kind, len(val_records), objective,
                 "LoRA" if c.lora.enabled else "full finetune", n_train, self.env.world_size, self.env.device, c.precision)
        return self

    # ------------------------------------------------------------------ loop

    def _batches(self, step: int) -> list[dict]:
        c, env = self.config, self.env
        out = []
        for positions in step_positions(step, c.batch_size, self.micro, env.rank, env.world_size):
            idx = stream_indices(c.seed, len(self.train_data), positions)
            out.append({k: v.to(env.device) for k, v in make_batch(self.train_data, idx, c.max_len).items()})
        return out

    def _loss(self, batch: dict):
        """Mean loss of a micro-batch, weighted by its number of records (pairs or ratings)."""
        loss, _ = reward_loss(self.model, batch, use_margin=self.config.use_margin)
        return loss, batch["margins" if "margins" in batch else "ratings"].shape[0]

    def train_step(self, step: int) -> dict:
        """One optimizer step over this process's micro-batches (every process's share of batch_size)."""
        c = self.config
        result: StepResult = self.run.optimizer_step(self._loss, self._batches(step))
        done = step + 1
        if self.val_data is not None and ((c.eval.every and done % c.eval.every == 0) or done == c.max_steps):
            self.metrics_ = self.validate(done)
        return {"train/loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                **({"skipped": 1} if result.skipped else {})}

    def train(self) -> dict:
        self.model.train()
        self.run.train(self)
        if self.val_data is not None and not self.metrics_:
            self.metrics_ = self.validate()
        return self.metrics_

    def validate(self, step: int | None = None) -> dict:
        """Held-out metrics under the training precision (every rank computes them; rank 0 logs)."""
        try:  # every rank scores the whole held-out set: as many forwards on each (FSDP gathers in each)
            with self.run.stepper_.autocast():
                metrics = evaluate(self.model, self.val_data, self.micro, self.config.max_len, self.env.device)
        finally:
            fsdp.reshard(self.model)
        step = self.step if step is None else step
        self.run.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
        log.info("step %d validation: %s", step, metrics)
        return metrics

    # ------------------------------------------------------------------ what a checkpoint holds

    def state_dict(self) -> dict:
        c = self.config
        optimizer = fsdp.optimizer_state(self.model, self.optimizer)  # FSDP: gathered, index-keyed
        return {"optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                "data": {k: _get(c, k) for k in _DATA_FIELDS}}

    def load_state_dict(self, state: dict, directory: Path) -> None:
        saved = state.get("data", {})
        changed = [k for k in _DATA_FIELDS if k in saved and saved[k] != _get(self.config, k)]
        if changed:
            log.warning("resuming %s with different %s: later batches differ from the interrupted run", directory,
                        ", ".join(changed))
        try:
            if not self.sharded:  # under FSDP the weights were loaded before sharding (setup)
                self.model.load_state_dict(RewardModel.from_pretrained(directory).state_dict())
            fsdp.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{directory}: does not fit this run ({e}); resume with the same model settings "
                                  f"(lora.*, objective, num_bins, optim.name), or set resume=never") from e

    def saveable(self, final: bool = False):
        if self.sharded:  # every rank gathers; rank 0 writes a plain copy
            return fsdp.gathered_copy(self.model, self.is_main)
        return self.model

    def cleanup(self) -> None:
        self.run.close()


def _get(config, dotted: str):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


__all__ = ["RewardTrainConfig", "RewardTrainer", "OBJECTIVES"]
