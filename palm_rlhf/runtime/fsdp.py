"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for models that do not fit on one device,
and the state-dict plumbing that keeps its checkpoints in the ordinary single-process format.

Each transformer block is its own shard unit (PaLM's parallel block and the families' sequential
block alike: `PaLM.layers`, or a `RewardModel`'s `palm.layers`), then the root (embedding, final
norm, logits, the LoRA scopes, a reward head). Checkpoints gather full (unsharded) tensors onto
the CPU; the optimizer state is stored keyed by parameter index exactly like
`optimizer.state_dict()`, so a checkpoint written under FSDP, DDP or one process loads into any of them.

Every rank must take part in every forward of a sharded module (each gathers the block's weights).
Where the ranks' forward counts differ (generation stops when a rank's rows are done; evaluation
shares) `gathered(model)` unshards every unit once and keeps it so, and the forwards inside need
no collective.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..model.checkpoint import load_into

__all__ = ["shard", "is_sharded", "reshard", "gathered", "full_model_state", "unsharded_copy", "optimizer_state",
           "load_optimizer_state", "full_tensors", "shard_like", "full_optimizer_state", "load_full_optimizer_state",
           "load_full_model_state", "gathered_copy", "full_budget_state", "budget_state_like", "PALM_METHODS"]

# the PaLM methods RL, DPO and generation call instead of `forward` (FSDP's hooks run on these too)
PALM_METHODS = ("hidden_states", "forward_cached")


def _blocks(model: nn.Module):
    if hasattr(model, "layers"):
        return model.layers
    return getattr(getattr(model, "palm", None), "layers", [])


def shard(model: nn.Module, methods: tuple[str, ...] = ()) -> nn.Module:
    """Shard `model` in place: each block, then the root. `methods`: the model's methods called
    instead of `forward` (e.g. `PALM_METHODS`, a RewardModel's "head"), which then gather and free
    the root's weights as `forward` does. Call it on every rank, after freezing what does not train
    and before building the optimizer (which must hold the sharded parameters)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for layer in _blocks(model):
        fully_shard(layer)
    fully_shard(model)
    for name in methods:
        register_fsdp_forward_method(model, name)
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


@contextlib.contextmanager
def gathered(*models: nn.Module):
    """Every shard unit of each sharded `models` unsharded on every rank for the block (one
    all-gather per unit, on entering), with no collective in the forwards inside: generation, whose
    number of decode steps differs by rank, and evaluations over shares of different sizes. The
    memory of the full model on each rank, for the block only; unsharded models pass through."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in models if is_sharded(m)]
    inner = [u for m in sharded for u in m.modules() if isinstance(u, FSDPModule) and u is not m]
    try:
        for unit in inner:
            unit.set_reshard_after_forward(False, recurse=False)
        for m in sharded:
            for unit in m.modules():
                if isinstance(unit, FSDPModule):
                    unit.unshard()
        yield
    finally:
        for unit in inner:
            unit.set_reshard_after_forward(True, recurse=False)
        for m in sharded:
            reshard(m)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict:
    """Unsharded CPU tensors of a sharded model (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def _palm_like(model: nn.Module) -> nn.Module:
    """A plain CPU PaLM with `model`'s config and LoRA scopes (rank, alpha, targets), fresh weights."""
    copy = type(model)(**model.config)
    alphas = getattr(model, "finetune_scope_alphas", {})
    targets = getattr(model, "finetune_scope_targets", {})
    for scope, rank in getattr(model, "finetune_scope_ranks", {}).items():
        copy.add_finetune_params(scope, rank, alphas.get(scope), targets=targets.get(scope))
    return copy


def unsharded_copy(model: nn.Module, state: dict) -> nn.Module:
    """A plain CPU copy of a sharded PaLM (or RewardModel: its `palm` and `reward_config`) with the
    gathered `state`."""
    if hasattr(model, "reward_config"):
        copy = type(model)(_palm_like(model.palm), **model.reward_config)
    else:
        copy = _palm_like(model)
    load_into(copy, state, source="gathered FSDP state")
    return copy


def gathered_copy(model: nn.Module, main: bool) -> nn.Module | None:
    """What a sharded trainer writes: every rank gathers `model`'s full state (a collective), the
    main rank gets a plain CPU copy (`unsharded_copy`), the others None."""
    state = full_model_state(model)
    return unsharded_copy(model, state) if main else None


def _budget_weights(budget: dict, convert) -> dict:
    """A `Budget.state_dict()` with its saved weights (`within_budget`'s state) passed through `convert`."""
    within = budget.get("within_budget")
    return {**budget, "within_budget": {**within, "state": convert(within["state"])}} if within else budget


def full_budget_state(budget: dict) -> dict:
    """`Budget.state_dict()` with the weights it keeps gathered (see `full_tensors`)."""
    return _budget_weights(budget, full_tensors)


def budget_state_like(budget: dict, like: dict) -> dict:
    """Inverse of `full_budget_state`: the kept weights cut into this rank's shards (see `shard_like`)."""
    return _budget_weights(budget, lambda state: shard_like(state, like))


def load_full_model_state(model: nn.Module, state: dict) -> None:
    """Load full (unsharded) tensors, present on every rank, into `model`, sharded or not."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return ()
    return DTensor


def full_tensors(state: dict) -> dict:
    """`state` with every sharded tensor (DTensor) gathered into a full one (a collective per
    sharded tensor, in `state`'s order: every rank calls it with the same keys)."""
    dtensor = _dtensor_type()
    return {k: v.full_tensor() if isinstance(v, dtensor) else v for k, v in state.items()}


def shard_like(state: dict, like: dict) -> dict:
    """Full tensors (the same on every rank) cut into this rank's shards wherever `like` (the live
    state dict they load into) holds a sharded tensor; no communication."""
    from torch.distributed.tensor import distribute_tensor

    dtensor = _dtensor_type()
    out = {}
    for k, v in state.items():
        target = like.get(k)
        if isinstance(target, dtensor) and not isinstance(v, dtensor):
            v = distribute_tensor(v.to(target.device, target.dtype), target.device_mesh, target.placements,
                                  src_data_rank=None)
        out[k] = v
    return out


def full_optimizer_state(optimizer) -> dict:
    """`optimizer.state_dict()` with sharded moment tensors gathered (the index-keyed format any
    process count loads); for optimizers over parameters of several modules (a value head beside the
    policy), where `optimizer_state` needs one model's names. A collective: every rank calls it."""
    state = optimizer.state_dict()
    return {**state, "state": {i: full_tensors(s) for i, s in sorted(state["state"].items())}}


def load_full_optimizer_state(optimizer, state: dict) -> None:
    """Inverse of `full_optimizer_state`: each rank keeps its shard of the full moments."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    dtensor = _dtensor_type()
    per_param = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        if isinstance(p, dtensor):
            like = {k: p for k, v in s.items() if isinstance(v, torch.Tensor) and v.shape == p.shape}
            s = shard_like(s, like)
        per_param[i] = s
    optimizer.load_state_dict({**state, "state": per_param})


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
