"""LoRA finetune scopes of the decoder: add, remove, merge, list (the seed's API).

A scope holds one `LoRASet` per layer: {target: LoRA} for the projections it adapts
(q, k, v, o; a Llama-family model also gate, up, down). `lora_slots` says where each
target's update lands in the block's weights, so creating, merging and applying a scope is
the same code for PaLM's fused block and the families' sequential block.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .lora import LORA_TARGETS, LoRA, LoRASet

PALM_LORA_KEYS = {"q": "0", "k": "1", "v": "2", "o": "3"}  # the seed's per-layer ModuleList indices


class FinetuneScopes:
    """Mixin for `PaLM`: its LoRA scopes (`finetune_modules`, ranks, alphas, targets)."""

    def lora_slots(self, layer: int) -> dict[str, tuple[Tensor, int, int]]:
        """{target: (weight (out, in), first row, end row)}: where each LoRA target's update lands."""
        if self.block == "parallel":
            blk = self.layers[layer].fn
            qd, d = self.heads * self.dim_head, self.dim_head
            fused = blk.fused_attn_ff_proj.weight
            return {"q": (fused, 0, qd), "k": (fused, qd, qd + d), "v": (fused, qd + d, qd + 2 * d),
                    "o": (blk.attn_out.weight, 0, self.dim)}
        blk = self.layers[layer]
        qd, kvd = blk.qkv_sizes[:2]
        return {"q": (blk.qkv.weight, 0, qd), "k": (blk.qkv.weight, qd, qd + kvd),
                "v": (blk.qkv.weight, qd + kvd, qd + 2 * kvd), "o": (blk.attn_out.weight, 0, self.dim),
                "up": (blk.gate_up.weight, 0, blk.ff_inner), "gate": (blk.gate_up.weight, blk.ff_inner, 2 * blk.ff_inner),
                "down": (blk.ff_down.weight, 0, self.dim)}

    def require_scope(self, scope: str) -> None:
        """ConfigError naming the scopes that exist unless `scope` is one of them."""
        if scope not in self.finetune_modules:
            existing = ", ".join(repr(s) for s in self.finetune_modules) or "none"
            raise ConfigError(f"unknown finetune scope {scope!r}; scopes that exist: {existing}. "
                              f"Create it with add_finetune_params({scope!r}).")

    def add_finetune_params(self, scope: str, lora_r: int | None = None, lora_alpha: float | None = None,
                            targets=None) -> None:
        """A new LoRA scope of rank `lora_r` (default: the model's) scaled by `lora_alpha / lora_r`
        with a bounded A (the trainers pass `DEFAULT_LORA_ALPHA`). `lora_alpha=None` (and
        `self.lora_alpha` None, the default) is the seed's LoRA: randn A, scale 1.
        `targets`: the projections adapted, from q, k, v, o, gate, up, down (default
        `self.lora_targets`, q k v o); PaLM's fused block takes q, k, v, o."""
        if scope in self.finetune_modules:
            existing = ", ".join(repr(s) for s in self.finetune_modules)
            raise ConfigError(f"finetune scope {scope!r} already exists (scopes: {existing}); "
                              f"pick a new name or remove_finetune_params({scope!r}) first.")
        r = self.lora_r if lora_r is None else lora_r
        alpha = self.lora_alpha if lora_alpha is None else lora_alpha
        if alpha is not None and not float(alpha) > 0:
            raise ConfigError(f"lora_alpha={lora_alpha!r}: must be > 0 (the LoRA output is scaled by alpha / r)")
        targets = tuple(self.lora_targets if targets is None else targets)
        allowed = tuple(self.lora_slots(0))
        bad = [t for t in targets if t not in allowed]
        if bad or not targets or len(set(targets)) != len(targets):
            kind = "PaLM's fused block" if self.block == "parallel" else "this model"
            raise ConfigError(f"lora targets {list(targets)}: {kind} takes distinct targets from "
                              f"{', '.join(allowed)} (all targets: {', '.join(LORA_TARGETS)})")
        targets = tuple(t for t in LORA_TARGETS if t in targets)  # a canonical order
        keys = PALM_LORA_KEYS if self.block == "parallel" else None
        param = self.token_emb.weight
        modules = nn.ModuleList()
        for i in range(len(self.layers)):
            slots = self.lora_slots(i)
            modules.append(LoRASet({t: LoRA(slots[t][0].shape[1], slots[t][2] - slots[t][1], r, alpha)
                                    for t in targets}, keys))
        self.finetune_modules[scope] = modules.to(device=param.device, dtype=param.dtype)
        self.finetune_scope_ranks[scope] = r
        self.finetune_scope_alphas[scope] = modules[0][0].alpha
        self.finetune_scope_targets[scope] = targets

    def remove_finetune_params(self, scope: str) -> nn.ModuleList:
        self.require_scope(scope)
        self.finetune_scope_ranks.pop(scope, None)
        self.finetune_scope_alphas.pop(scope, None)
        self.finetune_scope_targets.pop(scope, None)
        return self.finetune_modules.pop(scope)

    @torch.no_grad()
    def merge_finetune_params(self, scope: str) -> None:
        """Fold a scope's LoRA weights into the base weights and drop the scope."""
        modules = self.remove_finetune_params(scope)
        for i, lora_set in enumerate(modules):
            slots = self.lora_slots(i)
            for target, lora in lora_set.by_target().items():
                weight, start, end = slots[target]
                weight[start:end].add_(lora.weight.t().to(weight.dtype))

    def palm_parameters(self) -> list[nn.Parameter]:
        """Base parameters, never LoRA ones (a list in a stable order; the seed returned a set)."""
        lora = {id(p) for p in self.finetune_modules.parameters()}
        return [p for p in self.parameters() if id(p) not in lora]

    def finetune_parameters(self, scope: str = "default"):
        self.require_scope(scope)
        return self.finetune_modules[scope].parameters()

    def lora_layers(self, finetune_scope: str | None, disable_lora: bool = False) -> list:
        """Each layer's {target: LoRA} of a scope, or None per layer when no scope applies."""
        if finetune_scope is None or disable_lora:
            return [None] * len(self.layers)
        self.require_scope(finetune_scope)
        return [lora_set.by_target() for lora_set in self.finetune_modules[finetune_scope]]
