"""The reference policy: the policy as it was when RL started, frozen.

No full copy of the model is made when none is needed:
* actor LoRA scope that starts at zero (a fresh adapter): the reference is the same
  model with LoRA disabled;
* actor LoRA scope that starts non-zero (e.g. an SFT adapter): its weights are copied
  into a frozen sibling scope ``<scope>_ref`` of the same model (rank-r copies only);
* no actor scope (full fine-tuning): a frozen deep copy is the only option.
"""

from __future__ import annotations

import copy


def scope_is_zero(model, scope: str) -> bool:
    """True when the scope's LoRA update A @ B is exactly zero (every B is 0, as at creation)."""
    return all(bool((m.B == 0).all()) for m in model.finetune_modules[scope].modules() if hasattr(m, "B"))


class Reference:
    """Where the reference policy lives: `model`, its `scope` and whether LoRA is disabled
    (`disable_lora`); `kind` says how ("disabled_lora" | "frozen_scope" | "frozen_copy"). Its
    log-probs come from `palm_rlhf.generation.scoring.Scorer.reference_log_probs`."""

    def __init__(self, model, actor_scope: str | None):
        self.scope, self.disable_lora = None, False
        if actor_scope is None:
            self.kind = "frozen_copy"
            self.model = copy.deepcopy(model).eval().requires_grad_(False)
        elif scope_is_zero(model, actor_scope):
            self.kind, self.model, self.disable_lora = "disabled_lora", model, True
        else:
            self.kind, self.model = "frozen_scope", model
            self.scope = f"{actor_scope}_ref"
            if self.scope not in model.finetune_modules:
                model.add_finetune_params(self.scope, lora_r=model.finetune_scope_ranks[actor_scope],
                                          lora_alpha=model.finetune_scope_alphas[actor_scope])
            model.finetune_modules[self.scope].load_state_dict(model.finetune_modules[actor_scope].state_dict())
            model.finetune_modules[self.scope].requires_grad_(False)


__all__ = ["Reference", "scope_is_zero"]
