"""Shared helpers for the model tests (imported as `palm_testing`; a unique name
because test folders have no __init__.py): tiny PaLMs with weights large enough to matter.

`nn.init` leaves most projections near zero-mean with small variance, so two
implementations can agree by accident (every token ~ the same output). Tests
that compare implementations first rescale every weight with `randomize`.
"""

from __future__ import annotations

import torch

from palm_rlhf.model import PaLM

TINY = dict(dim=32, num_tokens=64, depth=2, heads=2, dim_head=16)


def randomize(module: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter (LoRA B included) with N(0, std^2) values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def make_palm(seed: int = 0, randomized: bool = True, **overrides) -> PaLM:
    torch.manual_seed(seed)
    model = PaLM(**{**TINY, **overrides}).eval()
    if randomized:
        randomize(model, seed=seed)
        with torch.no_grad():  # keep the LayerNorm gains near 1, as trained models have them
            for name, p in model.named_parameters():
                if name.endswith("norm.gamma"):
                    p.add_(1.0)
    return model
