"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685), parameter names as in the seed."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# the trainers' `lora_alpha` default. With the bounded A below and output scale alpha / r, Adam's
# early steps move the outputs by an amount that does not depend on r; 64 makes a rank-8 scope's
# first steps as large as the old init's (randn A, scale 1) on the tiny presets, so learning
# rates tuned before alpha existed keep their meaning (tests/model/test_lora_alpha.py)
DEFAULT_LORA_ALPHA = 64.0


class LoRA(nn.Module):
    """Low-rank update W = A @ B * (alpha / r); B starts at zero, so a new
    adapter leaves the model's outputs unchanged.

    A is drawn as peft and the LoRA paper's code do (Kaiming-uniform with a=sqrt(5) on the
    (r, dim) down-projection, i.e. U(-1/sqrt(dim), 1/sqrt(dim))), so `x @ A` has the same scale
    for every rank; the `alpha / r` factor then keeps Adam's early update size rank-independent
    and a learning rate tuned at one rank transfers to another.

    `alpha=None` is the seed's LoRA: A ~ randn and scale 1 (alpha = r), whose early step grows
    with r. The seed-compatible constructors keep it, so seed weights load and behave as before.
    """

    def __init__(self, dim: int, dim_out: int, r: int = 8, alpha: float | None = None):
        super().__init__()
        self.alpha = float(r if alpha is None else alpha)
        self.scale = self.alpha / r
        if alpha is None:
            self.A = nn.Parameter(torch.randn(dim, r))  # (dim, r)
        else:
            bound = 1.0 / math.sqrt(dim)
            self.A = nn.Parameter(torch.empty(dim, r).uniform_(-bound, bound))  # (dim, r)
        self.B = nn.Parameter(torch.zeros(r, dim_out))  # (r, dim_out)

    @property
    def weight(self) -> Tensor:
        return (self.A @ self.B) * self.scale  # (dim, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        # (x @ A) @ B costs r*(dim + dim_out) per token instead of dim*dim_out
        return (x @ self.A) @ self.B * self.scale


# the projections a LoRA scope can adapt, in the order of a block's weights
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
DEFAULT_LORA_TARGETS = ("q", "k", "v", "o")


class LoRASet(nn.ModuleDict):
    """One layer's adapters of one scope, keyed by the projection each adapts.

    `keys` maps a target name to the name its module is stored under: PaLM stores q, k, v, o
    as "0".."3", so a scope's parameters keep the seed's names
    (`finetune_modules.{scope}.{layer}.{0..3}.A`); the families store them by name
    (`finetune_modules.{scope}.{layer}.q.A`). `set[i]` reads the i-th stored module, as the
    seed's `ModuleList` did.
    """

    def __init__(self, modules: dict, keys: dict | None = None):
        super().__init__({(keys or {}).get(t, t): m for t, m in modules.items()})
        self.key_of = {t: (keys or {}).get(t, t) for t in modules}

    def __getitem__(self, key):
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)

    def by_target(self) -> dict:
        """{target: LoRA} for the targets this set adapts."""
        return {t: super(LoRASet, self).__getitem__(k) for t, k in self.key_of.items()}
