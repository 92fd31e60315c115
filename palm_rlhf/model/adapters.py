"""One setup for "train a LoRA adapter scope on a frozen base", used by finetune, reward models
(`RewardModel`), PPO's `ActorCritic`, GRPO and DPO."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError

__all__ = ["adapter_on_frozen_base"]


def adapter_on_frozen_base(palm, scope: str, *, r: int | None = None, alpha: float | None = None,
                           exist_ok: bool = True, **lora_options) -> list[nn.Parameter]:
    """Add LoRA scope `scope` to `palm` (an existing one is kept, unless `exist_ok=False`), freeze every
    base weight (backward then skips their gradients), and return the scope's parameters, trainable.
    Other scopes keep their flags. `lora_options` (e.g. `targets=`) go to `add_finetune_params`."""
    if scope in palm.finetune_modules:
        if not exist_ok:
            raise ConfigError(f"LoRA scope {scope!r} already exists in this model; choose another name")
    else:
        palm.add_finetune_params(scope, lora_r=r, lora_alpha=alpha, **lora_options)
    for p in palm.palm_parameters():
        p.requires_grad_(False)
    params = list(palm.finetune_parameters(scope))
    for p in params:
        p.requires_grad_(True)
    return params
