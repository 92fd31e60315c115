"""THE optimizer step: gradient accumulation, mixed precision, cross-process averaging,
clipping, non-finite detection, optimizer + scheduler step. Every trainer calls this.

    stepper = TrainStep(model, optimizer, scheduler, grad_accum=4, clip_grad_norm=1.0, precision="bf16")
    result = stepper(loss_fn, micro_batches, step=global_step)   # -> StepResult(loss, grad_norm, lr, ...)

`loss_fn(batch)` returns the micro-batch's *mean* loss, or `(mean_loss, weight)` where `weight`
is how many units (tokens, pairs) the mean is over. The step minimises the weighted mean over
every micro-batch of every process:

    L = sum_i w_i * loss_i / sum_i w_i          (i over micro-batches and processes)

Each micro-batch backpropagates `w_i * loss_i`; once all are done, the gradients are multiplied
by R / W (W = global sum of weights, R = number of processes whose gradients DDP/FSDP average),
which is exactly the gradient of L. So micro-batch x accumulation equals one big batch, and N
processes equal one process with the same global batch, also when micro-batches hold different
numbers of response tokens. With the default weight 1 this is the familiar mean of micro-batch
means (the seed divided by the accumulation count twice; this divides once).

Under torchrun the gradients are averaged by DDP or FSDP2, never tensor by tensor here: pass a
DDP/FSDP-wrapped model (pretraining does) or a bare one, whose trained parameters (the
optimizer's) TrainStep puts under DDP itself (`distributed.data_parallel`): `loss_fn` then runs
inside DDP's forward, and DDP's bucketed all-reduce overlaps the backward pass. Every process
must build its TrainStep (a collective), and every trained parameter must get a gradient from
each loss (DDP's default mode; DDP reports an unused one at the next step, by index, or by name
with TORCH_DISTRIBUTED_DEBUG=DETAIL).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import ConfigError, TrainingError
from .distributed import all_reduce_sum, data_parallel, has_group, is_distributed

__all__ = ["TrainStep", "StepResult", "PRECISIONS", "autocast_context"]

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class StepResult:
    loss: float        # weighted mean loss over all micro-batches of all processes
    grad_norm: float   # total gradient norm before clipping
    lr: float          # learning rate this step used
    weight: float      # global sum of weights (e.g. tokens) in this step
    skipped: bool      # fp16 only: the grad scaler skipped the update after an overflow


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CPU or CUDA, fp16 autocast on CUDA, nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _wrapper_syncs_grads(model: nn.Module) -> bool:
    """True when `model` averages gradients across processes itself (DDP or FSDP2)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


class TrainStep:
    """One optimizer step over a list of micro-batches; holds the fp16 grad scaler's state."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None, *,
                 grad_accum: int = 1, clip_grad_norm: float = 1.0, precision: str = "fp32",
                 device: torch.device | str | None = None):
        if precision not in PRECISIONS:
            raise ConfigError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}")
        if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
            raise ConfigError(f"grad_accum={grad_accum!r}: must be a positive integer")
        if clip_grad_norm < 0:
            raise ConfigError(f"clip_grad_norm={clip_grad_norm!r}: must be >= 0 (0 disables)")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("precision=fp16 needs a CUDA device; on CPU use precision=bf16 or fp32")
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.grad_accum = grad_accum
        self.clip_grad_norm = clip_grad_norm
        self.precision = precision
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        # the trained parameters are exactly the optimizer's
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        # a bare model under torchrun: DDP over the trained parameters, the loss run in its forward
        self.ddp = data_parallel(self.params) if has_group() and not _wrapper_syncs_grads(model) else None

    def autocast(self):
        """The forward-pass precision context (use it for evaluation too)."""
        return autocast_context(self.device, self.precision)

    @contextlib.contextmanager
    def _no_grad_sync(self, sync: bool):
        """Skip the cross-process gradient reduction on all but the last micro-batch."""
        m = self.ddp if self.ddp is not None else self.model
        if sync:
            yield
        elif isinstance(m, nn.parallel.DistributedDataParallel):
            with m.no_sync():
                yield
        elif hasattr(m, "set_requires_gradient_sync"):  # FSDP2
            m.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                m.set_requires_gradient_sync(True)
        else:
            yield

    def __call__(self, loss_fn: Callable, micro_batches: Sequence, *, step: int) -> StepResult:
        n = len(micro_batches)
        if n != self.grad_accum:
            raise TrainingError(f"step {step}: got {n} micro-batches, expected grad_accum={self.grad_accum}")
        lr = self.optimizer.param_groups[0]["lr"]
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # [sum w*loss, sum w]
        for i, batch in enumerate(micro_batches):
            with self._no_grad_sync(sync=i == n - 1):
                with self.autocast():
                    out = self.ddp(loss_fn, batch) if self.ddp is not None else loss_fn(batch)
                loss, weight = out if isinstance(out, tuple) else (out, 1.0)
                weight = torch.as_tensor(weight, dtype=torch.float32, device=self.device).detach()
                weighted = loss.float() * weight
                (self.scaler.scale(weighted) if self.scaler else weighted).backward()
            totals[0] += weighted.detach().double()
            totals[1] += weight.double()
        totals = all_reduce_sum(totals)
        total_loss, total_weight = totals.tolist()
        mean_loss = total_loss / total_weight if total_weight > 0 else float("nan")
        if not math.isfinite(mean_loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(f"step {step}: loss is {mean_loss} (weights sum {total_weight}); the model was not "
                                f"updated. Lower the learning rate, use precision=fp32, or check the data; "
                                f"resume from the last checkpoint")
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        self._finish_grads(total_weight)
        max_norm = self.clip_grad_norm if self.clip_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        skipped = False
        if self.scaler:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale
        else:
            if not math.isfinite(grad_norm):
                self.optimizer.zero_grad(set_to_none=True)
                raise TrainingError(f"step {step}: gradient norm is {grad_norm}; the model was not updated. "
                                    f"Lower the learning rate or use precision=fp32; resume from the last checkpoint")
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=mean_loss, grad_norm=grad_norm, lr=lr, weight=total_weight, skipped=skipped)

    def _finish_grads(self, total_weight: float) -> None:
        """Turn the accumulated sum of w_i * grad_i (averaged over the R processes by DDP/FSDP)
        into the gradient of the global weighted mean: multiply by R / W."""
        factor = (torch.distributed.get_world_size() if is_distributed() else 1) / total_weight
        if factor != 1.0:  # e.g. one process, one micro-batch of weight 1: already the mean's gradient
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(factor)

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
