"""Named model sizes: `configs/model/<name>.yaml`, from CPU-test tiny to PaLM 540B.

    load_preset("palm-8b")                  -> PaLM constructor kwargs (a dict)
    build_preset("palm-540b", device="meta") -> a PaLM whose tensors take no memory
    parameter_count(**load_preset("palm-62b")) -> 62_495_662_080, without building anything

The paper's sizes (Chowdhery et al. 2022, https://arxiv.org/abs/2204.02311,
Table 1: 8.63B, 62.50B, 540.35B) are the embedding plus the dense kernels:
`parameter_count(..., include_norms=False)`. Our models also hold (depth + 1)
LayerNorm gain vectors (2.2M parameters at 540B, which would print 540.36B);
the table evidently leaves them out. See docs/model.md.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch
import yaml  # the one non-torch dependency of `model`, and only here: presets are files

from ..errors import ConfigError

# palm_rlhf/configs/model/, shipped in the wheel as package data (a checkout's configs/ links
# there); PALM_RLHF_MODEL_CONFIGS points elsewhere, e.g. a directory of your own sizes
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"
INT_FIELDS = ("dim", "depth", "heads", "dim_head", "ff_mult", "num_tokens", "lora_r")


def preset_dir() -> Path:
    return Path(os.environ.get("PALM_RLHF_MODEL_CONFIGS", CONFIG_DIR))


def list_presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def load_preset(name_or_path: str | os.PathLike) -> dict:
    """PaLM constructor kwargs from a preset name (`palm-8b`) or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = preset_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown model preset {str(name_or_path)!r}; available: {', '.join(list_presets())} "
                          f"(in {preset_dir()}), or pass a path to a .yaml file")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping of PaLM arguments such as 'dim: 512'")
    from .palm import PaLM

    valid = set(inspect.signature(PaLM).parameters)  # the constructor's keyword arguments
    unknown = sorted(set(config) - valid)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(valid))}")
    return config


def build_preset(name_or_path, device: str | torch.device = "cpu", **overrides):
    """Instantiate a preset. On `device="meta"` nothing is allocated (shapes only),
    which is how the 540B configuration is inspected on a laptop."""
    from .palm import PaLM

    with torch.device(device):
        return PaLM(**{**load_preset(name_or_path), **overrides})


def parameter_count(*, dim, num_tokens, depth, heads=8, dim_head=64, ff_mult=4, qk_rmsnorm=False,
                    include_norms: bool = True, **_) -> int:
    """Closed-form parameter count of `PaLM(...)` (no LoRA scopes).

    Per block: one fused projection dim -> (heads*dim_head [q] + dim_head [k] + dim_head [v]
    + 2*ff_mult*dim [SwiGLU value and gate]), the attention output heads*dim_head -> dim,
    the feed-forward output ff_mult*dim -> dim and a LayerNorm gain (no biases anywhere).
    Plus the token embedding (tied with the output layer, so counted once) and the final gain.
    `include_norms=False` counts the embedding and dense kernels only (the paper's convention).
    """
    attn_inner, ff_inner = heads * dim_head, ff_mult * dim
    kernels = dim * (attn_inner + 2 * dim_head + 2 * ff_inner) + attn_inner * dim + ff_inner * dim
    norms = dim + (2 * dim_head if qk_rmsnorm else 0)  # LayerNorm gain (+ q/k scales)
    total = num_tokens * dim + depth * kernels
    return total + (depth * norms + dim if include_norms else 0)
