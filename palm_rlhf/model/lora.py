"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685), parameter names as in the seed."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LoRA(nn.Module):
    """Low-rank update W = A @ B * (alpha / r); B starts at zero, so a new
    adapter leaves the model's outputs unchanged."""

    def __init__(self, dim: int, dim_out: int, r: int = 8, alpha: float | None = None):
        super().__init__()
        alpha = r if alpha is None else alpha
        self.scale = alpha / r
        self.A = nn.Parameter(torch.randn(dim, r))
        self.B = nn.Parameter(torch.zeros(r, dim_out))

    @property
    def weight(self) -> Tensor:
        return (self.A @ self.B) * self.scale  # (dim, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        # (x @ A) @ B costs r*(dim + dim_out) per token instead of dim*dim_out
        return (x @ self.A) @ self.B * self.scale
