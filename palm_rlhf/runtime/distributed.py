"""Process-group setup from torchrun's environment: gloo on CPU, nccl on CUDA.

    env = init_distributed()        # WORLD_SIZE/RANK/LOCAL_RANK from torchrun, or 1 process
    ...
    cleanup()

Without torchrun everything degrades to a single process: `all_reduce_mean` returns its input
and `barrier` does nothing, so trainers call these unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import ConfigError

__all__ = ["DistEnv", "init_distributed", "resolve_device", "is_distributed", "all_reduce_mean",
           "all_reduce_sum", "barrier", "broadcast_object", "cleanup"]


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


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes (in place on a copy); identity in a single process."""
    if not is_distributed():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over processes; identity in a single process."""
    if not is_distributed():
        return t
    return all_reduce_sum(t) / dist.get_world_size()


def barrier() -> None:
    if is_distributed():
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
        dist.destroy_process_group()
