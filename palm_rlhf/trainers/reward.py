"""Reward-model training: `palm-rlhf reward train --config PRESET model=RUN data=FILE.jsonl`.

Pairwise records train with the Bradley-Terry loss, rating records with binned cross-entropy
or MSE. The loop is thin: batches come from `reward_data` (a pure function of the step, so
resume is exact); the run itself (out_dir, signals, checkpoints, resume, metrics, final/) is
`palm_rlhf.runtime.run`, THE optimizer step and the optimizer and schedule `palm_rlhf.runtime`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar


from ..data.preferences import read_preferences
from ..errors import CheckpointError, ConfigError, DataError
from ..model.reward import POOLINGS, RewardModel
from ..model.lora import DEFAULT_LORA_ALPHA
from ..runtime.optim import OPTIMIZERS, OptimConfig, build_optimizer, build_scheduler
from ..runtime.run import OnRun, Run, RunSettings
from ..runtime.step import PRECISIONS, StepResult
from .reward_data import batch_indices, encode_records, evaluate, make_batch, record_kind, reward_loss, split_validation
from .rl_setup import check_tokenizer, load_start

log = logging.getLogger(__name__)

OBJECTIVES = ("auto", "pairwise", "binned", "mse")
# fields that decide which records each step sees: changing them on resume changes the data order
_DATA_FIELDS = ("data", "val_data", "val_fraction", "batch_size", "grad_accum", "seed")


@dataclass
class RewardTrainConfig(RunSettings):
    ALIASES: ClassVar[dict[str, str]] = {"base": "model"}

    out_dir: str = "runs/reward"
    max_steps: int = 300
    save_every: int = 100
    log_every: int = 10
    model: str = ""                # the starting PaLM: a run directory (its final/), a final/ or checkpoint directory
    tokenizer: str | None = None   # None: the tokenizer saved with `model`
    data: str = ""                 # preference JSONL (palm_rlhf.data.preferences)
    val_data: str = ""             # held-out JSONL; empty: hold out val_fraction of `data`
    val_fraction: float = 0.1        # share of `data` held out when val_data is empty
    objective: str = "auto"        # auto: pairwise for pairwise records, binned for ratings
    num_bins: int = 5              # binned head: ratings are whole numbers in [0, num_bins - 1]
    pooling: str = "response_mean"   # how response positions become one score (palm_rlhf.model.reward.POOLINGS)
    use_lora: bool = True            # train a LoRA scope + head (false: every weight)
    lora_r: int = 8                  # LoRA rank
    lora_alpha: float = DEFAULT_LORA_ALPHA  # LoRA output scale alpha / r: a learning rate transfers across ranks
    dropout: float = 0.0             # dropout in the reward model
    use_margin: bool = True        # subtract each record's margin inside the Bradley-Terry loss
    max_len: int = 256               # prompt + response tokens per record (prompt cut from the left)
    batch_size: int = 16           # pairs (or ratings) per micro-batch per process
    grad_accum: int = 1              # micro-batches per optimizer step
    optimizer: str = "adamw"       # adamw | lion (palm_rlhf.runtime.optim)
    lr: float = 1e-3               # peak learning rate
    weight_decay: float = 0.0      # decoupled, on matrices only (not on norm gains or biases)
    warmup_steps: int = 10         # linear warmup, then cosine decay to lr * min_lr_ratio at max_steps
    min_lr_ratio: float = 0.1        # the cosine ends at lr * min_lr_ratio
    clip_grad_norm: float = 1.0    # 0 disables clipping
    eval_every: int = 50             # validate every N steps (and at the end)
    precision: str = "fp32"        # fp32 | bf16 (autocast, CPU or CUDA) | fp16 (CUDA, with a grad scaler)

    def __post_init__(self):
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective={self.objective!r}: use one of {', '.join(OBJECTIVES)}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling={self.pooling!r}: use one of {', '.join(POOLINGS)}")
        for name in ("batch_size", "grad_accum", "max_len", "lora_r", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r}: must be a positive integer")
        if self.num_bins < 2:
            raise ConfigError(f"num_bins={self.num_bins!r}: a binned head needs at least 2 bins")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction!r}: must be in [0, 1)")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr!r}: must be > 0")
        for name in ("warmup_steps", "weight_decay", "clip_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout!r}: must be in [0, 1)")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio!r}: must be in [0, 1]")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}: use one of {', '.join(PRECISIONS)}")
        # derived once here; the flat keys above stay the user-facing names
        self.optim = OptimConfig(name=self.optimizer, lr=self.lr, weight_decay=self.weight_decay,
                                 warmup_steps=self.warmup_steps, min_lr_ratio=self.min_lr_ratio,
                                 clip_grad_norm=self.clip_grad_norm)


class RewardTrainer(OnRun):
    """setup() -> train() -> cleanup(). One process, or one per device under torchrun."""

    name = "reward"
    postfix = ("train/loss",)

    def __init__(self, config: RewardTrainConfig, tokenizer=None):
        self.config = config
        self.tokenizer = tokenizer
        self.run = Run(config, self.name)
        self.metrics_: dict = {}

    # ------------------------------------------------------------------ setup

    def setup(self) -> "RewardTrainer":
        c = self.config
        if not c.model:
            raise ConfigError("model is not set; pass model=RUN_DIR (a run, final/ or save_pretrained directory)")
        if not c.data:
            raise ConfigError("data is not set; pass data=FILE.jsonl")
        self.run.open()
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
        if c.val_data:
            val_records = read_preferences(c.val_data)
            if record_kind(val_records, c.val_data) != kind:
                raise DataError(f"{c.val_data} holds different records than {c.data}; use the same kind")
            train_records = records
        else:
            train_records, val_records = split_validation(records, c.val_fraction, c.seed)

        palm, tokenizer = load_start(c.model, c.tokenizer)
        if self.tokenizer is None:
            self.tokenizer = tokenizer
        check_tokenizer(self.tokenizer, palm, where=f"model={c.model}")
        self.train_data = encode_records(train_records, self.tokenizer)
        self.val_data = encode_records(val_records, self.tokenizer) if val_records else None

        self.model = RewardModel(palm, dropout=c.dropout, num_binned_output=c.num_bins if objective == "binned" else 0,
                                 use_lora=c.use_lora, lora_r=c.lora_r, pooling=c.pooling,
                                 lora_alpha=c.lora_alpha).to(self.env.device)
        del palm
        # freeze what does not train, so backward skips the base weights' gradients
        trainable = {id(p) for p in self.model.finetune_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in trainable)
        self.optimizer = build_optimizer([(n, p) for n, p in self.model.named_parameters() if p.requires_grad],
                                         c.optim)
        self.scheduler = build_scheduler(self.optimizer, c.optim, c.max_steps)
        self.run.stepper(self.model, self.optimizer, self.scheduler, grad_accum=c.grad_accum,
                         clip_grad_norm=c.clip_grad_norm, precision=c.precision)
        self.run.start(self)
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("reward training: %d %s records (%d held out), objective %s, %s, %d trainable parameters, "
                 "%d process(es) on %s, %s", len(self.train_data), kind, len(val_records), objective,
                 "LoRA" if c.use_lora else "full finetune", n_train, self.env.world_size, self.env.device, c.precision)
        return self

    # ------------------------------------------------------------------ loop

    def _batch(self, step: int, micro: int) -> dict:
        c = self.config
        idx = batch_indices(step, micro, c.batch_size, c.grad_accum, len(self.train_data), c.seed,
                            self.env.rank, self.env.world_size)
        return {k: v.to(self.env.device) for k, v in make_batch(self.train_data, idx, c.max_len).items()}

    def _loss(self, batch: dict):
        """Mean loss of a micro-batch, weighted by its number of records (pairs or ratings)."""
        loss, _ = reward_loss(self.model, batch, use_margin=self.config.use_margin)
        return loss, batch["margins" if "margins" in batch else "ratings"].shape[0]

    def train_step(self, step: int) -> dict:
        """One optimizer step over grad_accum micro-batches (and every process's share)."""
        c = self.config
        micro_batches = [self._batch(step, m) for m in range(c.grad_accum)]
        result: StepResult = self.run.optimizer_step(self._loss, micro_batches)
        done = step + 1
        if self.val_data is not None and (done % c.eval_every == 0 or done == c.max_steps):
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
        with self.run.stepper_.autocast():
            metrics = evaluate(self.model, self.val_data, self.config.batch_size, self.config.max_len,
                               self.env.device)
        step = self.step if step is None else step
        self.run.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
        log.info("step %d validation: %s", step, metrics)
        return metrics

    # ------------------------------------------------------------------ what a checkpoint holds

    def state_dict(self) -> dict:
        c = self.config
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "data": {k: getattr(c, k) for k in _DATA_FIELDS}}

    def load_state_dict(self, state: dict, directory: Path) -> None:
        saved = state.get("data", {})
        changed = [k for k in _DATA_FIELDS if k in saved and saved[k] != getattr(self.config, k)]
        if changed:
            log.warning("resuming %s with different %s: later batches differ from the interrupted run", directory,
                        ", ".join(changed))
        try:
            self.model.load_state_dict(RewardModel.from_pretrained(directory).state_dict())
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{directory}: does not fit this run ({e}); resume with the same model settings "
                                  f"(use_lora, lora_r, objective, num_bins, optimizer), or set resume=never") from e

    def saveable(self, final: bool = False):
        return self.model

    def cleanup(self) -> None:
        self.run.close()


__all__ = ["RewardTrainConfig", "RewardTrainer", "OBJECTIVES"]
