"""Optimizers and the learning-rate schedule every trainer uses.

* `param_groups`: weight decay on matrices (ndim >= 2: projections, embeddings, LoRA factors),
  none on vectors (norm gains, biases), as in GPT-2/nanoGPT: decaying a norm gain towards 0
  only fights the normalisation.
* `Lion` (Chen et al. 2023, https://arxiv.org/abs/2302.06675): sign of an interpolated momentum,
  one state tensor per parameter instead of AdamW's two.
* `warmup_cosine`: linear warmup to the peak lr, cosine decay to `min_lr_ratio * lr` at `max_steps`
  (`optim.schedule=cosine`); `optim.schedule=constant` holds the peak lr after the warmup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable

import torch
from torch import nn

from ..errors import ConfigError
from .config import Converted, OldKeysAccepted

__all__ = ["OPTIMIZERS", "SCHEDULES", "OptimConfig", "param_groups", "Lion", "build_optimizer", "warmup_cosine",
           "build_scheduler"]

OPTIMIZERS = ("adamw", "lion")
SCHEDULES = ("cosine", "constant")


def _beta(i: int):
    def convert(value, values: dict) -> dict:
        betas = list(values.get("betas") or (0.9, 0.95))
        betas[i] = value
        return {"betas": betas}
    return convert


@dataclass
class OptimConfig(metaclass=OldKeysAccepted):
    """`optim.*`: the one optimizer section of every training command (built by `build_optimizer`)."""

    ALIASES: ClassVar[dict] = {"warmup_steps": "warmup", "clip_grad_norm": "max_grad_norm",
                               "beta1": Converted(_beta(0), "optim.betas=[B1,B2]"),
                               "beta2": Converted(_beta(1), "optim.betas=[B1,B2]")}

    name: str = "adamw"            # adamw | lion
    lr: float = 3e-4               # peak learning rate (Lion wants ~3-10x smaller than AdamW)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW's moment decays / Lion's interpolation and momentum decay
    eps: float = 1e-8              # AdamW's denominator floor
    weight_decay: float = 0.1      # decoupled, on matrices only (not on norm gains or biases)
    warmup: int = 100              # optimizer steps of linear warmup from 0 to lr
    schedule: str = "cosine"       # after warmup: cosine (decays to lr * min_lr_ratio at max_steps) | constant
    min_lr_ratio: float = 0.1      # the cosine ends at lr * min_lr_ratio
    max_grad_norm: float | None = 1.0  # clip the global gradient norm to this; 0 or null: no clipping

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optim.name={self.name!r}: use one of {', '.join(OPTIMIZERS)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"optim.lr={self.lr!r}: must be a positive number")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay={self.weight_decay!r}: must be >= 0")
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)!r}: two numbers in [0, 1)")
        if self.eps <= 0:
            raise ConfigError(f"optim.eps={self.eps!r}: must be > 0")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"optim.warmup={self.warmup!r}: must be an integer >= 0")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule={self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio!r}: must be in [0, 1]")
        if self.max_grad_norm is None:
            self.max_grad_norm = 0.0
        if self.max_grad_norm < 0:
            raise ConfigError(f"optim.max_grad_norm={self.max_grad_norm!r}: must be >= 0 (0: no clipping)")


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group (ndim >= 2) and a non-decayed one."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class Lion(torch.optim.Optimizer):
    """Lion: update = sign(beta1 * m + (1 - beta1) * g); m <- beta2 * m + (1 - beta2) * g."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled weight decay
                update = m.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


def build_optimizer(model_or_named, config: OptimConfig,
                    lr_of: Callable[[str, nn.Parameter], float | None] | None = None) -> torch.optim.Optimizer:
    """AdamW or Lion over decay/no-decay groups of a module (or of `(name, param)` pairs): THE optimizer
    of every trainer. `lr_of(name, param)` may give a parameter its own peak lr (PPO's critic);
    None keeps `config.lr`. Only parameters with requires_grad are optimized."""
    named = model_or_named.named_parameters() if isinstance(model_or_named, nn.Module) else model_or_named
    named = [(n, p) for n, p in named if p.requires_grad]
    by_lr: dict[float, list] = {}
    for n, p in named:
        lr = lr_of(n, p) if lr_of is not None else None
        by_lr.setdefault(config.lr if lr is None else float(lr), []).append((n, p))
    groups = []
    for lr, members in by_lr.items():
        for g in param_groups(members, config.weight_decay):
            groups.append({**g, "lr": lr})
    if not groups:
        raise ConfigError("no trainable parameters: nothing to optimize (did you freeze everything?)")
    if config.name == "lion":
        return Lion(groups, lr=config.lr, betas=config.betas)
    params = [p for g in groups for p in g["params"]]
    # one fused kernel per step (CPU and CUDA): 3.5x faster than the default per-tensor loop on a CPU
    # (12.8M parameters: 7.0 vs 24.6 ms); sharded (DTensor) parameters keep the default
    fused = all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused or None)


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio.

    warmup_steps=2, max_steps=6, min 0.1: steps 0..5 -> 0.5, 1.0, 1.0, 0.775, 0.325, 0.1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - 1 - warmup_steps)
    t = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, max_steps: int):
    """A LambdaLR: linear warmup over `config.warmup` steps, then `warmup_cosine`'s decay or a constant
    lr (`config.schedule`); its state_dict is all resume needs."""
    def schedule(step: int) -> float:
        if config.schedule == "constant":
            return (step + 1) / config.warmup if step < config.warmup else 1.0
        return warmup_cosine(step, config.warmup, max_steps, config.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
