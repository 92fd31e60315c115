"""The keys every training command shares, defined once: the `lora.*` and `eval.*` sections (`optim.*`
is `runtime.optim.OptimConfig`), the batch rule, and the old spellings each one replaces.

    batch_size        examples per optimizer step, summed over every process (pairs for DPO and reward
                      training, rollout rows for PPO and GRPO)
    micro_batch_size  examples per process per forward; 0: batch_size / processes (no accumulation).
                      Gradient accumulation = batch_size / (micro_batch_size * processes).

A trainer config holds `optim: OptimConfig`, `lora: LoraConfig`, `eval: EvalConfig` (each with the
command's own defaults) and merges the ALIASES below into its own, so `lr=`, `lora_r=`,
`val_fraction=` ... keep working for one release with one deprecation line naming the new key.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..model.lora import DEFAULT_LORA_ALPHA
from .config import Converted, OldKeysAccepted

log = logging.getLogger(__name__)

__all__ = ["LoraConfig", "EvalConfig", "LORA_TARGETS", "DEFAULT_TARGETS", "OPTIM_ALIASES", "LORA_ALIASES",
           "EVAL_ALIASES", "BATCH_ALIASES", "micro_batches_per_step", "step_positions", "lora_kwargs",
           "check_batch_keys", "DISTRIBUTED", "check_distributed"]

DISTRIBUTED = ("ddp", "fsdp")  # `distributed=`: how the trained weights are spread over torchrun's processes

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
DEFAULT_TARGETS = ("q", "k", "v", "o")


@dataclass
class LoraConfig(metaclass=OldKeysAccepted):
    """`lora.*`: the LoRA adapter a command trains on a frozen base."""

    r: int = 8                       # LoRA rank; 0: no adapter, every weight trains
    alpha: float = DEFAULT_LORA_ALPHA  # output scale alpha / r: a learning rate transfers across ranks
    dropout: float = 0.0             # dropout on the adapter's input
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS),
                               metadata={"help": "projections adapted, from q k v o gate up down"})
    scope: str = ""                  # name of the trained scope; "": the command's own (sft, reward, actor)

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
            raise ConfigError(f"lora.r={self.r!r}: must be an integer >= 0 (0: no adapter, every weight trains)")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha={self.alpha!r}: must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout!r}: must be in [0, 1)")
        self.targets = list(self.targets)
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"lora.targets={self.targets!r}: a list of distinct names from "
                              f"{', '.join(LORA_TARGETS)} (default: {','.join(DEFAULT_TARGETS)})")

    @property
    def enabled(self) -> bool:
        return self.r > 0


@dataclass
class EvalConfig(metaclass=OldKeysAccepted):
    """`eval.*`: when and on what a command measures held-out metrics."""

    every: int = 50                  # evaluate every N optimizer steps (and at the end); 0: only at the end
    data: str = ""                   # held-out file; empty: hold out `fraction` of the training data
    fraction: float = 0.1            # share of the training data held out (seeded shuffle) when eval.data is empty
    samples: int = 0                 # held-out examples one evaluation scores; 0: all of them

    def __post_init__(self):
        for name in ("every", "samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"eval.{name}={v!r}: must be an integer >= 0")
        if not 0.0 <= self.fraction < 1.0:
            raise ConfigError(f"eval.fraction={self.fraction!r}: must be in [0, 1)")


def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1", "on")
    return bool(value)


def _grad_accum(value, values: dict) -> dict:
    """Old `grad_accum=G` with the old per-process `batch_size=B`: micro-batches of B, G of them per step."""
    accum = int(value)
    if accum <= 1:
        return {}
    per_micro = int(values.get("batch_size") or 1)
    return {"micro_batch_size": per_micro, "batch_size": per_micro * accum}


OPTIM_ALIASES: dict = {"lr": "optim.lr", "weight_decay": "optim.weight_decay", "warmup_steps": "optim.warmup",
                       "min_lr_ratio": "optim.min_lr_ratio", "clip_grad_norm": "optim.max_grad_norm",
                       "max_grad_norm": "optim.max_grad_norm", "optimizer": "optim.name"}
LORA_ALIASES: dict = {"lora_r": "lora.r", "lora_alpha": "lora.alpha", "actor_scope": "lora.scope",
                      "use_lora": Converted(lambda v, values: {} if _truthy(v) else {"lora.r": 0},
                                            "lora.r=0 (train every weight) or lora.r=RANK")}
EVAL_ALIASES: dict = {"eval_every": "eval.every", "val_data": "eval.data", "val_fraction": "eval.fraction",
                      "heldout": "eval.data", "heldout_fraction": "eval.fraction"}
BATCH_ALIASES: dict = {"grad_accum": Converted(_grad_accum, "batch_size= (examples per optimizer step over all "
                                                            "processes) and micro_batch_size= (per process)"),
                       "minibatch_size": "batch_size"}


def check_batch_keys(batch_size: int, micro_batch_size: int) -> None:
    """What can be checked without knowing the number of processes (a config's __post_init__)."""
    for name, v, low in (("batch_size", batch_size, 1), ("micro_batch_size", micro_batch_size, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"{name}={v!r}: must be an integer >= {low}")
    if micro_batch_size and batch_size % micro_batch_size:
        raise ConfigError(f"batch_size={batch_size} is not a multiple of micro_batch_size={micro_batch_size}; "
                          f"batch_size counts examples per optimizer step over all processes, micro_batch_size "
                          f"per process per forward")


def check_distributed(value: str) -> None:
    """`distributed=`: ddp (every process holds the whole model) or fsdp (FSDP2: sharded by block)."""
    if value not in DISTRIBUTED:
        raise ConfigError(f"distributed={value!r}: use ddp or fsdp")


def micro_batches_per_step(batch_size: int, micro_batch_size: int, world_size: int) -> tuple[int, int]:
    """(examples per process per forward, forwards per optimizer step): batch_size = micro * accum * world."""
    if not micro_batch_size:
        if batch_size % world_size:
            lower, upper = batch_size - batch_size % world_size, batch_size - batch_size % world_size + world_size
            near = f"{lower} or {upper}" if lower else f"{upper}"
            raise ConfigError(f"batch_size={batch_size} does not divide over {world_size} processes; use {near}")
        return batch_size // world_size, 1
    per_step = micro_batch_size * world_size
    if batch_size % per_step:
        raise ConfigError(f"batch_size={batch_size} is not a multiple of micro_batch_size={micro_batch_size} x "
                          f"{world_size} process(es) = {per_step}; make batch_size a multiple of {per_step} or "
                          f"micro_batch_size a divisor of batch_size / {world_size}")
    return micro_batch_size, batch_size // per_step


def step_positions(step: int, batch_size: int, micro: int, rank: int, world_size: int) -> list[range]:
    """Positions in the endless example stream that process `rank` takes in optimizer step `step`, one
    range per micro-batch: step s covers positions s*B .. s*B+B-1, micro-batch i of them the block
    i*micro*W .. (i+1)*micro*W - 1, and rank r the r-th `micro` of that block. Every split of B into
    processes and micro-batches covers the same B positions: the same step."""
    per_block = micro * world_size
    start = step * batch_size
    return [range(start + i * per_block + rank * micro, start + i * per_block + (rank + 1) * micro)
            for i in range(batch_size // per_block)]


def lora_kwargs(add_finetune_params, lora: LoraConfig) -> dict:
    """The keywords `add_finetune_params` gets for `lora.targets` / `lora.dropout`: passed only where the
    model accepts them; a non-default setting it cannot take is a ConfigError (no knob that does nothing)."""
    accepted = inspect.signature(add_finetune_params).parameters
    out = {}
    if list(lora.targets) != list(DEFAULT_TARGETS):
        if "targets" not in accepted:
            raise ConfigError(f"lora.targets={lora.targets!r}: this model adapts only "
                              f"{','.join(DEFAULT_TARGETS)}; leave lora.targets at its default")
        out["targets"] = tuple(lora.targets)
    elif "targets" in accepted:
        out["targets"] = tuple(lora.targets)
    if lora.dropout:
        name = next((n for n in ("dropout", "lora_dropout") if n in accepted), None)
        if name is None:
            raise ConfigError(f"lora.dropout={lora.dropout!r}: this model's adapters have no dropout; "
                              f"set lora.dropout=0")
        out[name] = lora.dropout
    return out
