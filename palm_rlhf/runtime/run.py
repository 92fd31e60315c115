"""The one run runtime every trainer stands on (pretrain, finetune, reward, PPO, GRPO, DPO, quickstart).

A trainer holds its algorithm: setup, one step, what to save. Everything that makes it a *run*
lives here, once:

    run = Run(config, "ppo").open()    # out_dir usable (before any work), process group, seeds
    ... build data and model; run.stepper(model, optimizer, ...) makes THE optimizer step ...
    run.start(trainer)                 # resume (auto|never|must), metric sinks, OUT/config.yaml
    history = run.train(trainer)       # progress bar, metrics, signals, checkpoints, final/
    run.close()                        # closes what open/start/train opened, nothing else

The trainer protocol (duck-typed):

    tokenizer                          saved into every checkpoint and final/
    train_step(step) -> dict           one step; `step` counts steps done before it (0-based);
                                       returns the step's metrics (logged every `log_every`)
    state_dict() / load_state_dict(state, directory)
                                       what resumes it besides the step, RNG, stepper and config
    saveable() -> obj with save_pretrained(dir) | None
                                       what a checkpoint and final/ hold (called on every rank,
                                       so FSDP can gather; only rank 0 writes)
    postfix: tuple[str, ...]           metric keys shown on the progress bar

On SIGINT/SIGTERM the step in flight finishes, every rank agrees to stop, a checkpoint is
saved and `RunInterrupted` (a KeyboardInterrupt: the CLI exits 130) says to resume with the
same command. A non-finite loss stops the run with the 1-based number of the step that
diverged (`optimizer_step`), before the weights are touched.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import ClassVar

import torch
import yaml

from ..errors import CheckpointError, ConfigError
from ..model.checkpoint import save_adapter
from ..files import atomic_write_bytes, unusable_dir_reason
from . import distributed as rdist
from .checkpoint import CheckpointManager
from .config import OldKeysAccepted, config_to_dict
from .resolve import ADAPTER_NAME
from .metrics import MetricsLogger, check_report_to, default_report_to
from .seed import rng_state, seed_everything, set_rng_state
from .step import TrainStep

log = logging.getLogger(__name__)

__all__ = ["RunSettings", "Run", "RunInterrupted", "RESUME_MODES", "FINAL_NAME", "RUN_RECORD_NAME",
           "CONFIG_NAME", "ADAPTER_NAME", "MergedAdapter", "OnRun", "check_out_dir"]

RESUME_MODES = ("auto", "never", "must")
FINAL_NAME = "final"
RUN_RECORD_NAME = "run.json"
CONFIG_NAME = "config.yaml"


@dataclasses.dataclass
class RunSettings(metaclass=OldKeysAccepted):
    """The keys every training command shares (subclasses change defaults by redeclaring a field)."""

    ALIASES: ClassVar[dict[str, str]] = {}

    out_dir: str = "runs/run"      # the run directory (checkpoints, metrics, final/)
    max_steps: int = 100           # steps in all (a resumed run continues up to this)
    resume: str = "auto"           # auto: continue from OUT/checkpoints/latest if any | never | must (error if none)
    seed: int = 0                  # seeds data order, initialisation and sampling
    save_every: int = 0            # checkpoint every N steps; 0: only at the end (and on SIGINT/SIGTERM)
    keep_last: int = 2             # step checkpoints kept
    log_every: int = 1             # metrics row every N steps (and at the last step)
    report_to: list[str] = dataclasses.field(default_factory=default_report_to)  # jsonl tensorboard wandb mlflow
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    progress: bool = True          # a progress bar on stderr (main process only)

    def __post_init__(self):
        if not self.out_dir:
            raise ConfigError("out_dir is empty: set out_dir=runs/NAME")
        for name in ("max_steps", "keep_last", "log_every"):
            _positive(name, getattr(self, name))
        v = self.save_every
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"save_every={v!r}: must be an integer >= 0 (0: only at the end)")
        if self.resume not in RESUME_MODES:
            raise ConfigError(f"resume={self.resume!r}: use one of {', '.join(RESUME_MODES)}")
        # known sinks, each installed (else the pip command), jsonl first: one check, before any work
        self.report_to = check_report_to(self.report_to)


def _positive(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{name}={v!r}: must be a positive integer")


def _savable_tokenizer(trainer):
    """The trainer's tokenizer if it can save itself (a test's ad-hoc encoder cannot)."""
    tokenizer = getattr(trainer, "tokenizer", None)
    return tokenizer if hasattr(tokenizer, "save") else None


class RunInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM: the checkpoint is saved; the CLI maps this to exit code 130."""


def check_out_dir(directory: Path) -> None:
    """Create `directory` and prove it writable, or raise a one-line ConfigError saying what to change."""
    why = unusable_dir_reason(directory)
    if why is not None:
        raise ConfigError(f"out_dir={str(directory)!r} cannot be used: {why}; choose another out_dir")


class MergedAdapter:
    """final/ (and RL checkpoints) for a LoRA-trained scope: the base with `scope` merged in, as a
    save_pretrained directory, plus adapter.safetensors holding the scope alone (load_adapter)."""

    def __init__(self, model, scope: str):
        self.model, self.scope = model, scope

    def save_pretrained(self, directory) -> None:
        merged = copy.deepcopy(self.model).cpu()
        merged.merge_finetune_params(self.scope)
        for other in list(merged.finetune_modules):  # the merged base carries no LoRA scopes
            merged.remove_finetune_params(other)
        merged.save_pretrained(directory)
        save_adapter(self.model, self.scope, Path(directory) / ADAPTER_NAME)


class OnRun:
    """For trainers: the run's progress and process as attributes (`self.run` is their Run)."""

    run: "Run"

    @property
    def step(self) -> int:
        """Steps done."""
        return self.run.step

    step_done = step

    @property
    def env(self) -> rdist.DistEnv:
        return self.run.env

    @property
    def is_main(self) -> bool:
        return self.run.is_main

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir


class Run:
    def __init__(self, config: RunSettings, name: str):
        self.config = config
        self.name = name
        self.run_dir = Path(config.out_dir)
        self.step = 0                      # steps done
        self.env = rdist.DistEnv()
        self.ckpts: CheckpointManager | None = None
        self.metrics: MetricsLogger | None = None
        self.stepper_: TrainStep | None = None
        self.history: list[dict] = []
        self._owns_group = False
        self._handlers: dict = {}
        self._signal = None
        self._finished = False
        self._resume_point: Path | None | bool = False  # False: not decided yet

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    # ------------------------------------------------------------------ setup

    def open(self) -> "Run":
        """Before any work: the out_dir is usable, the process group joined, the seeds set."""
        self._owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        self.env = rdist.init_distributed(self.config.device)
        if self.is_main:
            check_out_dir(self.run_dir)
        rdist.barrier()
        seed_everything(self.config.seed)
        self.ckpts = CheckpointManager(self.run_dir, keep_last=self.config.keep_last, is_main=self.is_main)
        return self

    def check_divides(self, name: str, value: int, by: int | None = None) -> None:
        """`value` must split evenly over the processes (or `by`): a ConfigError with the nearest valid values."""
        by = self.env.world_size if by is None else by
        if by > 1 and value % by:
            lower, upper = value - value % by, value - value % by + by
            near = f"{lower} or {upper}" if lower else f"{upper}"
            raise ConfigError(f"{name}={value} does not divide over {by} processes; use {near}")

    def stepper(self, model, optimizer, scheduler=None, **kwargs) -> TrainStep:
        """THE optimizer step of this run (its state is checkpointed with the run)."""
        self.stepper_ = TrainStep(model, optimizer, scheduler, device=self.env.device, **kwargs)
        return self.stepper_

    def optimizer_step(self, loss_fn, micro_batches):
        """One optimizer step; a non-finite loss or gradient names the 1-based step being taken."""
        return self.stepper_(loss_fn, micro_batches, step=self.step + 1)

    def resume_point(self) -> Path | None:
        """The checkpoint this run continues from under `resume` (auto|never|must), or None."""
        if self._resume_point is False:
            latest = None if self.config.resume == "never" else self.ckpts.latest()
            if latest is None and self.config.resume == "must":
                raise CheckpointError(f"resume=must: no checkpoint in {self.ckpts.dir}; run without resume=must "
                                      f"to start, or point out_dir at the run to continue")
            self._resume_point = latest
        return self._resume_point

    def start(self, trainer) -> "Run":
        """Resume per `resume`, open the metric sinks, write OUT/config.yaml."""
        c = self.config
        latest = self.resume_point()
        if latest is not None:
            state = self.ckpts.load(latest, map_location="cpu")
            saved_world = state.get("world_size", 1)
            if saved_world != self.env.world_size:
                log.warning("resuming %s on %d process(es) (saved on %d): later batches may differ from the "
                            "interrupted run", latest, self.env.world_size, saved_world)
            trainer.load_state_dict(state.get("trainer", {}), latest)
            if self.stepper_ is not None:
                self.stepper_.load_state_dict(state.get("stepper", {}))
            set_rng_state(state["rng"])
            self.step = int(state["step"])
            log.info("%s: resumed from %s at step %d", self.name, latest, self.step)
        self.metrics = MetricsLogger(self.run_dir, is_main=self.is_main,
                                     resume_step=self.step if latest is not None else None,
                                     report_to=c.report_to, config=config_to_dict(c))
        if self.is_main:
            text = yaml.safe_dump(config_to_dict(c), sort_keys=False)
            atomic_write_bytes(self.run_dir / CONFIG_NAME, text.encode())
        return self

    # ------------------------------------------------------------------ loop

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self.metrics is not None and metrics:
            self.metrics.log(self.step if step is None else step, metrics)

    def advance(self, trainer) -> dict:
        """One step of `trainer`, counted and logged (what `train` repeats)."""
        metrics = trainer.train_step(self.step)
        self.step += 1
        self.history.append({"step": self.step, **metrics})
        if self.step % self.config.log_every == 0 or self.step == self.config.max_steps:
            self.log(metrics)
        return metrics

    def train(self, trainer) -> list[dict]:
        """Steps up to max_steps: log, checkpoint every save_every, stop cleanly on a signal, write final/."""
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        c = self.config
        self._install_signal_handlers()
        bar = tqdm(total=c.max_steps, initial=self.step, desc=self.name, dynamic_ncols=True,
                   disable=not (c.progress and self.is_main))
        last_saved = self.step if self.step and self.ckpts.latest() is not None else None
        try:
            with logging_redirect_tqdm():  # log lines print above the bar, not glued onto it
                while self.step < c.max_steps:
                    metrics = self.advance(trainer)
                    bar.update(1)
                    shown = {k: f"{metrics[k]:.4f}" for k in getattr(trainer, "postfix", ()) if k in metrics}
                    if shown:
                        bar.set_postfix(shown)
                    if self._should_stop():
                        self.save_checkpoint(trainer)
                        msg = (f"{self.name} stopped by signal at step {self.step}; checkpoint saved in "
                               f"{self.ckpts.dir}; resume with the same command")
                        log.warning(msg)
                        raise RunInterrupted(msg)
                    if c.save_every and self.step % c.save_every == 0:
                        self.save_checkpoint(trainer)
                        last_saved = self.step
                    if getattr(trainer, "stop_requested", False):  # e.g. DPO past its KL budget
                        log.info("%s: stopping at step %d (the trainer asked to)", self.name, self.step)
                        break
                if last_saved != self.step:
                    self.save_checkpoint(trainer)
                self.write_final(trainer)
                self._finished = True
        finally:
            bar.close()
            self._restore_signal_handlers()
        return self.history

    # ------------------------------------------------------------------ saving

    def save_checkpoint(self, trainer) -> Path | None:
        """Every rank calls this (the trainer's state may gather shards); only rank 0 writes."""
        state = {"step": self.step, "trainer": trainer.state_dict(), "rng": rng_state(),
                 "stepper": self.stepper_.state_dict() if self.stepper_ is not None else {},
                 "config": config_to_dict(self.config), "world_size": self.env.world_size}
        saveable = trainer.saveable()
        path = self.ckpts.save(self.step, state, model=saveable, tokenizer=_savable_tokenizer(trainer))
        rdist.barrier()
        return path

    def write_final(self, trainer) -> Path:
        """OUT/final/: what the trainer saves + its tokenizer + run.json, published by one rename."""
        saveable = trainer.saveable(final=True)
        final = self.run_dir / FINAL_NAME
        if self.is_main:
            tmp = self.run_dir / f".tmp-{FINAL_NAME}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            saveable.save_pretrained(tmp)
            tokenizer = _savable_tokenizer(trainer)
            if tokenizer is not None:
                tokenizer.save(tmp)
            source = getattr(self.config, "model", "")
            info = {"algorithm": self.name, "source_model": source if isinstance(source, str) else "",
                    "steps": self.step, **getattr(trainer, "final_record", dict)()}
            atomic_write_bytes(tmp / RUN_RECORD_NAME, (json.dumps(info, indent=2) + "\n").encode())
            trash = None
            if final.exists():
                trash = self.run_dir / f".tmp-old-{FINAL_NAME}-{os.getpid()}"
                os.replace(final, trash)
            os.replace(tmp, final)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
            log.info("%s: final model in %s", self.name, final)
        rdist.barrier()  # no rank tears the process group down while rank 0 still writes
        return final

    # ------------------------------------------------------------------ signals

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            self._signal = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self) -> None:
        for sig, old in self._handlers.items():
            signal.signal(sig, old)
        self._handlers = {}

    def _should_stop(self) -> bool:
        flag = torch.tensor([0.0 if self._signal is None else 1.0], device=self.env.device)
        return bool(rdist.all_reduce_sum(flag).item() > 0)  # every rank stops at the same step

    # ------------------------------------------------------------------ cleanup

    def close(self) -> None:
        """Close only what this run opened (safe after a failed setup, and twice)."""
        self._restore_signal_handlers()
        if self.metrics is not None:
            self.metrics.close(ok=self._finished)  # a tracker run that did not finish is marked failed
            self.metrics = None
        if self._owns_group:
            rdist.cleanup()
            self._owns_group = False
