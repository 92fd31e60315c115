"""The NCCL rule, enforced where there is no GPU, so the next CPU tensor handed to a collective
fails in CI rather than on the first CUDA run.

NCCL takes only tensors on this process's GPU: a tensor built on the CPU (a `torch.tensor(...)`
of statistics, say) raises `No backend type associated with device type cpu`. `install(device)`
wraps torch.distributed's tensor collectives so that each one rejects:

1. a tensor that is not on `device`, the model's device (what NCCL itself checks on a GPU, and
   what this rule checks there too: NCCL_RULE_DEVICE=cuda);
2. a collective issued by any code but `palm_rlhf/runtime/distributed.py` (and torch's own
   DDP/FSDP/object-collective internals). On a CPU machine the model's device *is* the CPU, so a
   tensor that would sit on the CPU under CUDA cannot be told apart from one on the model's
   device; the rule therefore pins every collective of ours to the one module whose helpers
   copy their input onto a device the group serves (`collective_device`; tested against
   NCCL-like groups in test_nccl_rule.py).

As a launcher, it runs palm-rlhf under the rule (on a GPU inside an NCCL group it creates, so that
one process exercises NCCL and DDP too) and, with NCCL_RULE_LOG=PATH, writes one line per
collective it let through (name, caller, device) to PATH.rankN, so a test can see it was armed:

    python -m torch.distributed.run --nproc_per_node 2 -m nccl_rule ppo model=... prompts=...
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import palm_rlhf.runtime.distributed as rdist

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "all_to_all", "all_to_all_single", "gather", "scatter")
RUNTIME_FILE = str(Path(rdist.__file__).resolve())
TORCH_DIR = str(Path(torch.__file__).resolve().parent)
seen: list[tuple[str, str, str]] = []  # (collective, caller file:line, device) of each call let through


class NCCLRuleError(RuntimeError):
    pass


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)


def _checked(name: str, real, device: torch.device):
    @functools.wraps(real)
    def collective(*args, **kwargs):
        frame = sys._getframe(1)
        caller = str(Path(frame.f_code.co_filename).resolve())
        where = f"{caller}:{frame.f_lineno}"
        for t in _tensors(list(args) + list(kwargs.values())):
            if t.device != device:
                raise NCCLRuleError(f"NCCL rule: {name} got a tensor on {t.device} but the model is on {device} "
                                    f"(NCCL: No backend type associated with device type {t.device.type}); "
                                    f"called from {where}")
        if caller != RUNTIME_FILE and not caller.startswith(TORCH_DIR):
            raise NCCLRuleError(f"NCCL rule: {name} called from {where}; collectives go through "
                                f"palm_rlhf.runtime.distributed (all_reduce_sum, ...), which puts their tensors "
                                f"on the process group's device")
        seen.append((name, where, str(device)))
        return real(*args, **kwargs)

    collective.nccl_rule_wraps = real
    return collective


def install(device: torch.device | str = "cpu") -> None:
    """Wrap the collectives (idempotent); `uninstall()` restores them."""
    uninstall()
    for name in COLLECTIVES:
        setattr(dist, name, _checked(name, getattr(dist, name), torch.device(device)))


def uninstall() -> None:
    for name in COLLECTIVES:
        real = getattr(getattr(dist, name), "nccl_rule_wraps", None)
        if real is not None:
            setattr(dist, name, real)


def main(argv: list[str]) -> int:
    from palm_rlhf.cli.main import main as cli_main

    device = os.environ.get("NCCL_RULE_DEVICE", "cpu")
    if device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    install(device)
    own_group = torch.device(device).type == "cuda" and not dist.is_initialized()
    if own_group:  # a real NCCL group even for one process (init_distributed forms none for 1)
        torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl", device_id=torch.device(device))
    try:
        return cli_main(argv)
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()
        log = os.environ.get("NCCL_RULE_LOG")
        if log:
            rank = os.environ.get("RANK", "0")
            Path(f"{log}.rank{rank}").write_text("".join(f"{n}\t{w}\t{d}\n" for n, w, d in seen))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
