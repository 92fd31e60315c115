"""Tiny models for tests, built one way everywhere (the fixtures in tests/conftest.py hand them out).

`nn.init` leaves most projections near zero-mean with small variance, so two implementations can
agree by accident (every token ~ the same output). Tests that compare implementations use
`make_palm` (every weight rescaled by `randomize`); tests of generation and decoding plumbing,
where PaLM's own initialisation is what a user starts from, use `tiny_palm`.
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
    """A TINY PaLM (any constructor argument overridden) in eval mode, built after
    `torch.manual_seed(seed)`; `randomized`: weights N(0, 0.2^2), LayerNorm gains near 1."""
    torch.manual_seed(seed)
    model = PaLM(**{**TINY, **overrides}).eval()
    if randomized:
        randomize(model, seed=seed)
        with torch.no_grad():  # keep the LayerNorm gains near 1, as trained models have them
            for name, p in model.named_parameters():
                if name.endswith("norm.gamma"):
                    p.add_(1.0)
    return model


def tiny_palm(seed: int = 0, **overrides) -> PaLM:
    """`make_palm` with PaLM's own initialisation (what `PaLM(...)` gives after `torch.manual_seed(seed)`)."""
    return make_palm(seed, randomized=False, **overrides)


# The Llama family's settings of the same decoder (palm_rlhf.model.families writes them from a
# checkpoint): grouped-query attention, untied embeddings, llama3 rope scaling; Qwen-style q/k/v
# biases with per-head q/k RMSNorm
FAMILY_SETTINGS = {
    "llama": dict(block="sequential", heads=4, kv_heads=2, dim_head=8, ff_inner=48, tie_embeddings=False,
                  rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                  family="llama", cross_entropy_ignore_index=-100),
    "qwen": dict(block="sequential", heads=4, kv_heads=2, dim_head=8, ff_inner=48, qkv_bias=True, qk_norm=True,
                 family="qwen3", cross_entropy_ignore_index=-100),
}


def family_builder(family: str):
    """A builder like `make_palm` for a Llama-family configuration (norm gains kept near 1)."""
    def build(seed: int = 0, randomized: bool = True, **overrides) -> PaLM:
        torch.manual_seed(seed)
        model = PaLM(**{**TINY, **FAMILY_SETTINGS[family], **overrides}).eval()
        if randomized:
            randomize(model, seed=seed)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("norm.weight"):
                        p.add_(1.0)
        return model
    return build


# One tiny builder per model family, all taking (seed, randomized, **overrides). The `model_factory`
# fixture (tests/conftest.py) runs a test once per entry.
BUILDERS = {"palm": make_palm, "llama": family_builder("llama"), "qwen": family_builder("qwen")}
FAMILIES = tuple(BUILDERS)


def make_model(family: str = "palm", seed: int = 0, randomized: bool = True, **overrides):
    """A tiny model of `family` (one of FAMILIES)."""
    return BUILDERS[family](seed, randomized=randomized, **overrides)
