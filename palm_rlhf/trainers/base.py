"""What the language-model trainers (pretrain, finetune) share: the model shape, the optimizer and
schedule, DDP/FSDP2 wrapping, one step over micro-batches, evaluation, and what a checkpoint holds.

A subclass supplies the data and the loss (`build_data`, `build_model`, `micro_batches`,
`loss`, `evaluate`). The run itself (out_dir, config.yaml, signals, checkpoints and resume,
metrics, the NaN guard, final/, cleanup) is `palm_rlhf.runtime.run.Run`, as for every trainer.

Exact resume: a step's batches are a pure function of (seed, step, rank), and a checkpoint
holds the model, optimizer, scheduler, grad-scaler, every RNG state and the step, so a resumed
run repeats the uninterrupted run's losses bit for bit (on the same device and thread count).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..model.checkpoint import load_into
from ..files import load_state_dict_file
from ..runtime import fsdp
from ..ops import eval_mode
from ..runtime.config import Converted
from ..runtime.optim import OptimConfig, build_optimizer, build_scheduler
from ..runtime.run import OnRun, Run, RunSettings
from ..runtime.step import PRECISIONS
from ..runtime.vocab import (BATCH_ALIASES, EVAL_ALIASES, EvalConfig, check_batch_keys, check_distributed,
                             micro_batches_per_step)

log = logging.getLogger(__name__)

__all__ = ["ModelConfig", "RunConfig", "LMTrainer"]


@dataclass
class ModelConfig:
    """PaLM shape; the vocabulary size comes from the tokenizer."""
    dim: int = 256                   # model width
    depth: int = 4                   # number of blocks
    heads: int = 4                   # query heads (one shared key/value head)
    dim_head: int = 64               # width of each attention head
    ff_mult: int = 4                 # feed-forward width = ff_mult * dim (SwiGLU)
    attn_dropout: float = 0.0        # dropout on attention weights
    ff_dropout: float = 0.0          # dropout in the feed-forward
    qk_rmsnorm: bool = False         # RMS-normalise queries and keys
    flash_attn: bool = False         # accepted for compatibility: attention always runs through SDPA
    rotary_xpos_scale_base: int = 512  # xPos scale base of the rotary embedding

    def __post_init__(self):
        if self.flash_attn:
            log.warning("model.flash_attn=true has no effect: attention always runs through "
                        "torch's scaled_dot_product_attention, which picks the fastest kernel itself")

    def kwargs(self, num_tokens: int) -> dict:
        return dict(dim=self.dim, depth=self.depth, heads=self.heads, dim_head=self.dim_head, ff_mult=self.ff_mult,
                    attn_dropout=self.attn_dropout, ff_dropout=self.ff_dropout, qk_rmsnorm=self.qk_rmsnorm,
                    rotary_xpos_scale_base=self.rotary_xpos_scale_base,
                    num_tokens=num_tokens)


@dataclass
class RunConfig(RunSettings):
    """Fields every language-model trainer shares (plus the run's own: out_dir, max_steps, resume, ...)."""

    ALIASES: ClassVar[dict] = {**BATCH_ALIASES, **EVAL_ALIASES,
                               "eval_batches": Converted(lambda v, values: {"eval.samples": int(v) * int(
                                   values.get("batch_size") or 1)}, "eval.samples= (held-out examples)")}

    out_dir: str = "runs/train"
    max_steps: int = 1000
    log_every: int = 10
    save_every: int = 200          # 0: only at the end (and on SIGINT/SIGTERM)
    keep_last: int = 3
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 16           # examples per optimizer step, over all processes
    micro_batch_size: int = 0      # examples per process per forward (accumulation); 0: batch_size / processes
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(every=100, fraction=0.05))
    sample_every: int = 0          # 0: no generated samples
    sample_tokens: int = 128         # tokens per generated sample
    precision: str = "fp32"        # fp32 | bf16 (CPU or CUDA) | fp16 (CUDA, with a grad scaler)
    compile: bool = False          # torch.compile the training forward
    distributed: str = "ddp"       # ddp | fsdp (FSDP2 fully_shard), used under torchrun
    threads: int = 0               # torch.set_num_threads; 0 keeps torch's default

    def __post_init__(self):
        super().__post_init__()
        check_batch_keys(self.batch_size, self.micro_batch_size)
        for name in ("sample_tokens",):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r}: must be a positive integer")
        for name in ("sample_every", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name}={v!r}: must be an integer >= 0")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}: use one of {', '.join(PRECISIONS)}")
        check_distributed(self.distributed)


class LMTrainer(OnRun):
    """setup() -> train() -> cleanup(). One process, or one per device under torchrun."""

    name = "train"
    postfix = ("train/loss", "tokens_per_s")

    def __init__(self, config: RunConfig):
        self.config = config
        self.run = Run(config, self.name)
        self.tokens_seen = 0
        self.tokenizer = None
        self.summary: dict = {}

    # ------------------------------------------------------------------ subclass hooks

    def build_data(self) -> None:
        """Load/validate data and set `self.tokenizer` (fail here, before any training)."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        """The PaLM to train, trainable parameters marked with requires_grad."""
        raise NotImplementedError

    def micro_batches(self, step: int) -> list:
        raise NotImplementedError

    def loss(self, batch):
        """Mean loss of a micro-batch and its weight (e.g. the number of target tokens)."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        return {}

    def sample(self) -> str | None:
        return None

    def final_model(self) -> nn.Module:
        """What final/ holds (the trained model; finetune merges its LoRA scope)."""
        return self.model

    # ------------------------------------------------------------------ setup

    def setup(self) -> "LMTrainer":
        c = self.config
        self.run.open()
        if c.threads:
            torch.set_num_threads(c.threads)
        self.micro, self.accum = micro_batches_per_step(c.batch_size, c.micro_batch_size, self.env.world_size)
        self.build_data()
        self.model = self.build_model().to(self.env.device)
        latest = self.run.resume_point()
        if latest is not None:  # weights before wrapping: FSDP shards what it is given
            load_into(self.model, load_state_dict_file(latest / "model.safetensors", map_location=self.env.device),
                      source=str(latest))
        self.wrapped = self._wrap(self.model)
        self.forward_module = torch.compile(self.wrapped) if c.compile else self.wrapped
        # evaluation forwards: DDP's own forward syncs with the other ranks, FSDP's gathers the weights
        self.eval_forward = self.wrapped if fsdp.is_sharded(self.wrapped) else self.model
        self.optimizer = build_optimizer(self.model, c.optim)
        self.scheduler = build_scheduler(self.optimizer, c.optim, c.max_steps)
        self.run.stepper(self.wrapped, self.optimizer, self.scheduler, grad_accum=self.accum,
                         clip_grad_norm=c.optim.max_grad_norm, precision=c.precision)
        self.run.start(self)
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("%s: %d trainable parameters, %d process(es) on %s, step %d of %d", self.name, n_train,
                 self.env.world_size, self.env.device, self.step, c.max_steps)
        return self

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.env.world_size == 1:
            return model
        if self.config.distributed == "fsdp":
            return fsdp.shard(model)
        ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    # ------------------------------------------------------------------ what a checkpoint holds

    def state_dict(self) -> dict:
        # batches are a function of (seed, step): the step *is* the data position
        return {"optimizer": fsdp.optimizer_state(self.wrapped, self.optimizer),
                "scheduler": self.scheduler.state_dict(), "tokens_seen": self.tokens_seen,
                "global_batch": self.config.batch_size}

    def load_state_dict(self, state: dict, directory: Path) -> None:
        before = state.get("global_batch")
        now = self.config.batch_size
        if before is not None and before != now:
            log.warning("global batch changed on resume (%d -> %d sequences per step): the data order differs "
                        "from the interrupted run", before, now)
        try:
            fsdp.load_optimizer_state(self.wrapped, self.optimizer, state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{directory}: optimizer state does not fit this run ({e}); resume with the "
                                  f"same trainable parameters and optimizer, or set resume=never") from e
        self.tokens_seen = int(state.get("tokens_seen", 0))

    def saveable(self, final: bool = False):
        """The model to write, gathered from every rank under FSDP (None off rank 0 there)."""
        if fsdp.is_sharded(self.wrapped):
            return fsdp.gathered_copy(self.wrapped, self.is_main)
        return self.final_model() if final else self.model

    # ------------------------------------------------------------------ one step

    def train(self) -> dict:
        self.model.train()
        self._t0, self._tokens0 = time.perf_counter(), self.tokens_seen
        self.run.train(self)
        return {"step": self.step, **self.summary}

    def train_step(self, step: int) -> dict:
        c = self.config
        result = self.run.optimizer_step(self.loss, self.micro_batches(step))
        self.tokens_seen += int(result.weight)
        elapsed = time.perf_counter() - self._t0
        done = step + 1
        metrics = {"train/loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                   "tokens": self.tokens_seen,
                   "tokens_per_s": (self.tokens_seen - self._tokens0) / elapsed if elapsed > 0 else 0.0,
                   **({"skipped": 1} if result.skipped else {})}
        self.summary["train/loss"] = result.loss
        if (c.eval.every and done % c.eval.every == 0) or done == c.max_steps:
            self.summary.update(self._evaluate(done))
        if c.sample_every and done % c.sample_every == 0 and self.is_main:
            text = self.sample()
            if text is not None:
                self.run.metrics.log_text(done, "sample", text)
                log.info("sample at step %d:\n%s", done, text)
        return metrics

    def _evaluate(self, done: int) -> dict:
        try:
            with eval_mode(self.model), torch.no_grad(), self.run.stepper_.autocast():
                metrics = self.evaluate()
        finally:
            fsdp.reshard(self.wrapped)
        if metrics:
            self.run.log(metrics, step=done)
            log.info("step %d: %s", done, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def cleanup(self) -> None:
        self.run.close()


def bits_per_byte(loss_nats: float, tokens: int, n_bytes: int) -> float:
    """Cross entropy in nats/token -> bits per UTF-8 byte of the same text."""
    if n_bytes <= 0 or not math.isfinite(loss_nats):
        return float("nan")
    return loss_nats / math.log(2) * tokens / n_bytes
