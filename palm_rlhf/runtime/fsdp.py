"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for models that do not fit on one device,
and the state-dict plumbing that keeps its checkpoints in the ordinary single-process format.

Each transformer block is its own shard unit, then the root (embedding, final norm, tied
logits). Checkpoints gather full (unsharded) tensors onto the CPU; the optimizer state is stored
keyed by parameter index exactly like `optimizer.state_dict()`, so a checkpoint written under
FSDP, DDP or one process loads into any of them.
"""

from __future__ import annotations

from torch import nn

from ..model.checkpoint import load_into

__all__ = ["shard", "is_sharded", "reshard", "full_model_state", "unsharded_copy", "optimizer_state", "load_optimizer_state"]


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in getattr(model, "layers", []):
        fully_shard(layer)
    fully_shard(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FSDPModule)


def reshard(model: nn.Module) -> None:
    """Free the unsharded parameters a no-grad forward leaves behind (the root keeps them after
    forward), so `named_parameters()` again yields the sharded ones the optimizer holds."""
    if not is_sharded(model):
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict:
    """Unsharded CPU tensors of a sharded model (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def unsharded_copy(model: nn.Module, state: dict) -> nn.Module:
    """A plain CPU PaLM with `model`'s config, LoRA scopes and the gathered `state`."""
    copy = type(model)(**model.config)
    alphas = getattr(model, "finetune_scope_alphas", {})
    for scope, rank in getattr(model, "finetune_scope_ranks", {}).items():
        copy.add_finetune_params(scope, rank, alphas.get(scope))
    load_into(copy, state, source="gathered FSDP state")
    return copy


def _param_names(model: nn.Module, optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def optimizer_state(model: nn.Module, optimizer) -> dict:
    """`optimizer.state_dict()`; under FSDP the gathered full state in that same index-keyed format."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not full:  # with cpu_offload only rank 0 receives the gathered state
        return {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]
    return {"state": {index[n]: v for n, v in full["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    """Inverse of `optimizer_state` (under FSDP each rank keeps its own shard of the full state)."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    full = {"state": {names[int(i)]: v for i, v in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))
