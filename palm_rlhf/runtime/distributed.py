"""Process-group setup from torchrun's environment (gloo on CPU, nccl on CUDA) and the collectives
every trainer uses.

    env = init_distributed()        # WORLD_SIZE/RANK/LOCAL_RANK from torchrun, or 1 process
    sums = all_reduce_sum({"reward": r, "rows": n})        # numbers, a list, or a tensor
    ...
    cleanup()

Collectives run on tensors of a device the process group serves: NCCL takes only CUDA tensors
(a CPU tensor raises `No backend type associated with device type cpu`), so a value built on the
CPU is copied to this process's CUDA device for the reduction and the result comes back where the
caller had it. Trainers call these helpers, never `torch.distributed` collectives directly
(tests/runtime/test_nccl_rule.py enforces it). Gradients are not reduced here: `TrainStep`
puts the trained parameters under DDP (`data_parallel`), whose bucketed all-reduce overlaps the
backward pass.

Without a process group everything degrades to a single process: the reductions return their
input and `barrier` does nothing, so trainers call these unconditionally.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

from typing import Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError

__all__ = ["DistEnv", "init_distributed", "resolve_device", "is_distributed", "has_group", "group_devices",
           "collective_device", "all_reduce_mean", "all_reduce_sum", "barrier", "broadcast_object", "cleanup",
           "LossForward", "data_parallel"]

Values = TypeVar("Values", torch.Tensor, dict, list)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) logs and saves."""
        return self.rank == 0


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> this process's CUDA device when available, else CPU; 'cuda' picks cuda:local_rank."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device == "cuda":
        device = f"cuda:{local_rank}"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device={device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}: CUDA is not available here; use device=cpu")
    return dev


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group torchrun describes (or none) and pick this process's device."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise ConfigError("WORLD_SIZE > 1 but MASTER_ADDR is not set; launch with "
                              "`torchrun --nproc_per_node N -m palm_rlhf ...`")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def has_group() -> bool:
    """A process group exists (torchrun, any number of processes, 1 included)."""
    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    return has_group() and dist.get_world_size() > 1


def group_devices() -> tuple[str, ...]:
    """Device types the default process group takes tensors on: ('cuda',) for NCCL, ('cpu', 'cuda')
    for gloo or a group created for both backends (`cpu:gloo,cuda:nccl`)."""
    pg = dist.group.WORLD
    types = getattr(pg, "_device_types", None)  # the backends registered per device type
    if types:
        return tuple(sorted(torch.device(t).type for t in types))
    backend = str(dist.get_backend())  # older torch: "nccl", "gloo" or "cpu:gloo,cuda:nccl"
    if ":" in backend:
        return tuple(sorted(part.split(":")[0] for part in backend.split(",")))
    return ("cuda",) if backend == "nccl" else ("cpu", "cuda")


def collective_device(preferred: torch.device | str | None = None) -> torch.device:
    """Where a collective's tensor goes: `preferred` when the group serves its type, else this
    process's CUDA device under NCCL, else the CPU."""
    served = group_devices()
    if preferred is not None and torch.device(preferred).type in served:
        return torch.device(preferred)
    if "cpu" in served:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _reduce(values: Values, device, op) -> Values:
    """All-reduce `values` (a tensor, a list of numbers or a dict name -> number) with `op`. A tensor
    comes back on its own device with its dtype; numbers come back as floats."""
    if isinstance(values, torch.Tensor):
        t = values.detach()
        staged = t.to(collective_device(t.device if device is None else device), copy=True)
        dist.all_reduce(staged, op=op)
        return staged.to(t.device)
    keys = list(values) if isinstance(values, dict) else None
    numbers = [float(values[k]) for k in keys] if keys is not None else [float(v) for v in values]
    out = _reduce(torch.tensor(numbers, dtype=torch.float64), device, op).tolist()
    return dict(zip(keys, out)) if keys is not None else out


def all_reduce_sum(values: Values, device: torch.device | str | None = None) -> Values:
    """Sum over processes (the input is not modified); identity without a process group.
    `device`: where to reduce when the group serves it (default: the tensor's own device, and
    the CPU for numbers under gloo, this process's CUDA device under NCCL)."""
    return _reduce(values, device, dist.ReduceOp.SUM) if has_group() else values


def all_reduce_mean(values: Values, device: torch.device | str | None = None) -> Values:
    """Mean over processes; identity without a process group."""
    if not has_group():
        return values
    world = dist.get_world_size()
    total = all_reduce_sum(values, device)
    if isinstance(total, torch.Tensor):
        return total / world
    return {k: v / world for k, v in total.items()} if isinstance(total, dict) else [v / world for v in total]


def barrier() -> None:
    if has_group():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank (e.g. a decision only rank 0 can make)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        # a DDP wrapper left in a reference cycle must go before its group: destroyed after it, its
        # reducer aborts the process at exit ("terminate called without an active exception")
        gc.collect()
        dist.destroy_process_group()


class LossForward(nn.Module):
    """The trained parameters as one module whose forward runs a loss function.

    DDP reduces the gradients of the parameters of the module it wraps, and arms its hooks in that
    module's forward. An RL or DPO loss calls several methods of the model (scoped log-probs, the
    critic's values) rather than one `forward`, and trains a few LoRA scopes of a larger frozen
    model; so DDP wraps exactly the optimizer's parameters here, and the loss function runs
    inside its forward: `ddp(loss_fn, batch)`.
    """

    def __init__(self, params: Sequence[nn.Parameter]):
        super().__init__()
        self.trained = nn.ParameterList(params)  # the same Parameter objects, not copies

    def forward(self, loss_fn, *args, **kwargs):
        return loss_fn(*args, **kwargs)


def data_parallel(params: Sequence[nn.Parameter]) -> nn.Module:
    """DDP over `params` (bucketed all-reduce, overlapped with the backward pass): call the result
    as `wrapped(loss_fn, batch)` and backpropagate its loss. Every process must call this, with
    its parameters in the same order; rank 0's values are broadcast to the others."""
    module = LossForward(params)
    if not has_group():
        return module
    # device_ids=None: inputs are not moved (the batch is already on the model's device); no buffers
    return nn.parallel.DistributedDataParallel(module, device_ids=None, broadcast_buffers=False)
