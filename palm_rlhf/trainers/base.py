"""The loop shared by the language-model trainers (pretrain, finetune): setup, train, save, cleanup.

A subclass supplies the data and the loss (`build_data`, `build_model`, `micro_batches`,
`loss`, `evaluate`); everything else is `palm_rlhf.runtime`: the distributed environment,
THE optimizer step (`TrainStep`), the optimizer and schedule, checkpoints, metrics, seeding.

Exact resume: a step's batches are a pure function of (seed, step, rank), and a checkpoint
holds the model, optimizer, scheduler, grad-scaler, every RNG state and the step, so a resumed
run repeats the uninterrupted run's losses bit for bit (on the same device and thread count).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..model.checkpoint import load_into, load_state_dict_file
from ..runtime import distributed as rdist
from ..runtime.checkpoint import CheckpointManager
from ..runtime.config import config_to_dict
from ..runtime.metrics import MetricsLogger
from ..runtime.optim import OptimConfig, build_optimizer, build_scheduler
from ..runtime.seed import rng_state, seed_everything, set_rng_state
from ..runtime.step import PRECISIONS, TrainStep
from ..runtime import fsdp

log = logging.getLogger(__name__)

__all__ = ["ModelConfig", "RunConfig", "LMTrainer"]


@dataclass
class ModelConfig:
    """PaLM shape; the vocabulary size comes from the tokenizer."""
    dim: int = 256
    depth: int = 4
    heads: int = 4
    dim_head: int = 64
    ff_mult: int = 4
    attn_dropout: float = 0.0
    ff_dropout: float = 0.0
    qk_rmsnorm: bool = False
    flash_attn: bool = False
    rotary_xpos_scale_base: int = 512

    def kwargs(self, num_tokens: int) -> dict:
        return dict(dim=self.dim, depth=self.depth, heads=self.heads, dim_head=self.dim_head, ff_mult=self.ff_mult,
                    attn_dropout=self.attn_dropout, ff_dropout=self.ff_dropout, qk_rmsnorm=self.qk_rmsnorm,
                    flash_attn=self.flash_attn, rotary_xpos_scale_base=self.rotary_xpos_scale_base,
                    num_tokens=num_tokens)


@dataclass
class RunConfig:
    """Fields every language-model trainer shares."""
    out_dir: str = "runs/train"
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 16           # sequences per micro-batch per process
    grad_accum: int = 1            # micro-batches per optimizer step
    max_steps: int = 1000
    log_every: int = 10
    eval_every: int = 100          # 0: only at the end
    eval_batches: int = 8
    sample_every: int = 0          # 0: no generated samples
    sample_tokens: int = 128
    save_every: int = 200          # 0: only at the end (and on SIGINT/SIGTERM)
    keep_last: int = 3
    seed: int = 0
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    precision: str = "fp32"        # fp32 | bf16 (CPU or CUDA) | fp16 (CUDA, with a grad scaler)
    compile: bool = False          # torch.compile the training forward
    distributed: str = "ddp"       # ddp | fsdp (FSDP2 fully_shard), used under torchrun
    resume: str = "auto"           # auto: continue from OUT/checkpoints/latest if any | never
    threads: int = 0               # torch.set_num_threads; 0 keeps torch's default
    progress: bool = True

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "eval_batches", "sample_tokens",
                     "keep_last"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r}: must be a positive integer")
        for name in ("eval_every", "sample_every", "save_every", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name}={v!r}: must be an integer >= 0")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.distributed not in ("ddp", "fsdp"):
            raise ConfigError(f"distributed={self.distributed!r}: use ddp or fsdp")
        if self.resume not in ("auto", "never"):
            raise ConfigError(f"resume={self.resume!r}: use auto or never")
        if not self.out_dir:
            raise ConfigError("out_dir is empty: set out_dir=runs/NAME")


def check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"out_dir={str(directory)!r} is not writable ({e}); choose another out_dir") from None


class LMTrainer:
    """setup() -> train() -> cleanup(). One process, or one per device under torchrun."""

    name = "train"

    def __init__(self, config: RunConfig):
        self.config = config
        self.step = 0
        self.tokens_seen = 0
        self.tokenizer = None
        self.metrics = None
        self._stop_signal = None
        self._old_handlers = {}

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

    def save_final(self, directory: Path) -> None:
        self.model.save_pretrained(directory)
        self.tokenizer.save(directory)

    # ------------------------------------------------------------------ setup

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def setup(self) -> "LMTrainer":
        c = self.config
        self.env = rdist.init_distributed(c.device)
        if c.threads:
            torch.set_num_threads(c.threads)
        self.run_dir = Path(c.out_dir)
        if self.is_main:
            check_writable(self.run_dir)
        seed_everything(c.seed)
        self.build_data()
        self.model = self.build_model().to(self.env.device)
        self.ckpts = CheckpointManager(self.run_dir, keep_last=c.keep_last, is_main=self.is_main)
        state = None
        latest = self.ckpts.latest() if c.resume == "auto" else None
        if latest is not None:
            state = self.ckpts.load(latest, map_location="cpu")
            load_into(self.model, load_state_dict_file(latest / "model.safetensors", map_location=self.env.device),
                      source=str(latest))
        self.wrapped = self._wrap(self.model)
        self.forward_module = torch.compile(self.wrapped) if c.compile else self.wrapped
        self.optimizer = build_optimizer([(n, p) for n, p in self.model.named_parameters() if p.requires_grad],
                                         c.optim)
        self.scheduler = build_scheduler(self.optimizer, c.optim, c.max_steps)
        self.stepper = TrainStep(self.wrapped, self.optimizer, self.scheduler, grad_accum=c.grad_accum,
                                 clip_grad_norm=c.optim.clip_grad_norm, precision=c.precision, device=self.env.device)
        if state is not None:
            self._load_state(state)
        self.metrics = MetricsLogger(self.run_dir, is_main=self.is_main,
                                     resume_step=self.step if state is not None else None)
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

    def _load_state(self, state: dict) -> None:
        c = self.config
        saved = state.get("config", {})
        before = saved.get("batch_size", c.batch_size) * saved.get("grad_accum", c.grad_accum) * state.get("world_size", 1)
        now = c.batch_size * c.grad_accum * self.env.world_size
        if before != now:
            log.warning("global batch changed on resume (%d -> %d sequences per step): the data order differs "
                        "from the interrupted run", before, now)
        try:
            fsdp.load_optimizer_state(self.wrapped, self.optimizer, state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{state['dir']}: optimizer state does not fit this run ({e}); resume with the "
                                  f"same trainable parameters and optimizer, or set resume=never") from e
        self.stepper.load_state_dict(state.get("step_state", {}))
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        log.info("resumed from %s at step %d", state["dir"], self.step)

    # ------------------------------------------------------------------ loop

    def train(self) -> dict:
        from tqdm import tqdm

        c = self.config
        summary: dict = {"interrupted": False}
        self._install_signal_handlers()
        bar = tqdm(total=c.max_steps, initial=self.step, desc=self.name, dynamic_ncols=True,
                   disable=not (c.progress and self.is_main))
        self.model.train()
        last_saved = self.step
        t0, tokens0 = time.perf_counter(), self.tokens_seen
        try:
            while self.step < c.max_steps:
                result = self.stepper(self.loss, self.micro_batches(self.step), step=self.step)
                self.step += 1
                self.tokens_seen += int(result.weight)
                elapsed = time.perf_counter() - t0
                tps = (self.tokens_seen - tokens0) / elapsed if elapsed > 0 else 0.0
                summary["train/loss"] = result.loss
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{tps:,.0f}")
                if self.step % c.log_every == 0 or self.step == c.max_steps:
                    self.metrics.log(self.step, {"train/loss": result.loss, "lr": result.lr,
                                                 "grad_norm": result.grad_norm, "tokens": self.tokens_seen,
                                                 "tokens_per_s": tps, **({"skipped": 1} if result.skipped else {})})
                if (c.eval_every and self.step % c.eval_every == 0) or self.step == c.max_steps:
                    summary.update(self._evaluate())
                if c.sample_every and self.step % c.sample_every == 0 and self.is_main:
                    text = self.sample()
                    if text is not None:
                        self.metrics.log_text(self.step, "sample", text)
                        bar.write(f"--- sample at step {self.step} ---\n{text}\n---")
                if self._should_stop():
                    self.save_checkpoint()
                    log.warning("stopped by signal at step %d; checkpoint saved, resume with the same command",
                                self.step)
                    summary["interrupted"] = True
                    return summary
                if c.save_every and self.step % c.save_every == 0:
                    self.save_checkpoint()
                    last_saved = self.step
            if last_saved != self.step or self.ckpts.latest() is None:
                self.save_checkpoint()
            self._save_final()
        finally:
            bar.close()
            self._restore_signal_handlers()
        summary["step"] = self.step
        return summary

    def _evaluate(self) -> dict:
        self.model.eval()
        try:
            with torch.no_grad(), self.stepper.autocast():
                metrics = self.evaluate()
        finally:
            self.model.train()
            fsdp.reshard(self.wrapped)
        if metrics:
            self.metrics.log(self.step, metrics)
            log.info("step %d: %s", self.step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "optimizer": fsdp.optimizer_state(self.wrapped, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "step_state": self.stepper.state_dict(),
            "rng": rng_state(),
            # batches are a function of (seed, step): the step *is* the data position
            "data": {"next_step": self.step, "seed": self.config.seed},
            "config": config_to_dict(self.config),
            "world_size": self.env.world_size,
        }

    def save_checkpoint(self) -> Path | None:
        """Every rank calls this (FSDP gathers shards); only the main process writes."""
        state = self.state_dict()
        model = fsdp.full_model_state(self.wrapped) if fsdp.is_sharded(self.wrapped) else self.model
        path = None
        if self.is_main:
            if isinstance(model, dict):  # a gathered FSDP state: written through an unsharded copy
                model = fsdp.unsharded_copy(self.model, model)
            path = self.ckpts.save(self.step, state, model=model, tokenizer=self.tokenizer)
        rdist.barrier()
        return path

    def _save_final(self) -> None:
        """RUN_DIR/final: a save_pretrained directory + tokenizer (what generate/quickstart load)."""
        if fsdp.is_sharded(self.wrapped):
            state = fsdp.full_model_state(self.wrapped)
            if self.is_main:
                copy = fsdp.unsharded_copy(self.model, state)
                copy.save_pretrained(self.run_dir / "final")
                self.tokenizer.save(self.run_dir / "final")
        elif self.is_main:
            self.save_final(self.run_dir / "final")
        rdist.barrier()

    # ------------------------------------------------------------------ signals

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            self._stop_signal = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers = {}

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_signal is not None else 0.0], device=self.env.device)
        return bool(rdist.all_reduce_sum(flag).item() > 0)  # every rank stops together

    def cleanup(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self._restore_signal_handlers()
        rdist.cleanup()


def bits_per_byte(loss_nats: float, tokens: int, n_bytes: int) -> float:
    """Cross entropy in nats/token -> bits per UTF-8 byte of the same text."""
    if n_bytes <= 0 or not math.isfinite(loss_nats):
        return float("nan")
    return loss_nats / math.log(2) * tokens / n_bytes
