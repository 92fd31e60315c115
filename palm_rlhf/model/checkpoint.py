"""Checkpoint files that cannot run code: safetensors, or `.pt` read with weights_only.

Layout of a `save_pretrained` directory:

    config.json          PaLM constructor arguments + finetune scopes, their ranks and LoRA alphas
                         (`finetune_scope_alphas`; a scope without one is a pre-alpha adapter: scale 1)
    model.safetensors    every persistent tensor except the tied `to_logits.weight`

Adapters (one LoRA scope) are saved alone by `save_adapter` as a small
safetensors file whose metadata records the scope name, rank and `lora_alpha` (absent in
files written before alpha existed: those load with alpha = r, the scale they were trained with).

Files are written and read through `palm_rlhf.files` (atomic writes, safe `.pt` reads).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..errors import CheckpointError
from ..files import atomic_save_tensors, atomic_write_bytes, load_state_dict_file, read_safetensors_header
from .lora import DEFAULT_LORA_TARGETS

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
TIED_KEY = "to_logits.weight"  # any model's (a PaLM's, or a RewardModel's palm.*)


def load_into(model: nn.Module, state: dict, source: str = "state dict", strict: bool = True) -> None:
    """`load_state_dict` that names missing, unexpected and wrongly-shaped keys."""
    state = dict(state)
    own = model.state_dict()
    for key in own:  # the output projection is tied to the token embedding: stored once or twice
        embedding = key.removesuffix(TIED_KEY) + "token_emb.weight"
        if key.endswith(TIED_KEY) and key not in state and embedding in state:
            state[key] = state[embedding]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if wrong or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:12])}{' ...' if len(unexpected) > 12 else ''}")
        if wrong:
            parts.append(f"wrong shapes: {'; '.join(wrong[:12])}")
        hint = ""
        if any(k.startswith("finetune_modules.") for k in unexpected):
            hint = " (the file has LoRA scopes: add them with add_finetune_params first)"
        raise CheckpointError(f"{source} does not match the model{hint}: " + " | ".join(parts))
    model.load_state_dict(state, strict=strict)


# ---------------------------------------------------------------- save_pretrained / from_pretrained


def palm_config(model, skip: str | None = None) -> dict:
    """A PaLM's constructor arguments plus its scopes' ranks, alphas and targets (all but `skip`);
    targets only where they differ from q, k, v, o (files stay readable by older versions)."""
    targets = {s: list(t) for s, t in model.finetune_scope_targets.items() if s != skip and t != DEFAULT_LORA_TARGETS}
    return {**model.config,
            "finetune_scopes": {s: r for s, r in model.finetune_scope_ranks.items() if s != skip},
            "finetune_scope_alphas": {s: a for s, a in model.finetune_scope_alphas.items() if s != skip},
            **({"finetune_scope_targets": targets} if targets else {})}


def _tied(state: dict, key: str) -> bool:
    embedding = key.removesuffix(TIED_KEY) + "token_emb.weight"
    return embedding in state and state[key].data_ptr() == state[embedding].data_ptr()


def write_pretrained(model: nn.Module, directory, config: dict) -> Path:
    """`config.json` and every persistent tensor but a tied output projection, atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.endswith(TIED_KEY) and _tied(state, k))}
    atomic_save_tensors(state, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_bytes(directory / CONFIG_NAME, json.dumps(config, indent=2).encode())
    return directory


def save_pretrained(model, directory) -> Path:
    return write_pretrained(model, directory, {**palm_config(model), "format_version": FORMAT_VERSION,
                                               "layernorm_gain": "absolute"})


def read_config(directory) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; is this a directory written by save_pretrained?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def build_palm(cls, config: dict, source, **overrides):
    """`cls(**config)` with the config's saved scopes recreated (no weights loaded)."""
    config = dict(config)
    scopes = config.pop("finetune_scopes", {}) or {}
    alphas = config.pop("finetune_scope_alphas", {}) or {}
    targets = config.pop("finetune_scope_targets", {}) or {}
    for key in ("format_version", "layernorm_gain"):
        config.pop(key, None)
    try:
        model = cls(**{**config, **overrides})
    except TypeError as e:
        raise CheckpointError(f"{source}: {e}") from e
    add_saved_scopes(model, scopes, alphas, targets)
    return model


def from_pretrained(cls, directory, map_location="cpu", dtype=None, **overrides):
    """A model directory: ours (save_pretrained) or a Hugging Face checkpoint of a supported family
    (`palm_rlhf.model.families`). `dtype` (fp32, bf16; a name or a torch dtype): ours keep the
    saved dtype unless it is given; a family checkpoint loads as fp32 unless it is given."""
    from .families import is_family_config, load_family, parse_dtype

    directory = Path(directory)
    config = read_config(directory)
    if config.get("model_type") == "reward_model":  # RewardModel.from_pretrained says the converse
        raise CheckpointError(f"{directory} holds a reward model, not a PaLM: load it with RewardModel.from_pretrained "
                              f"(palm-rlhf reward score); generate, serve and feedback serve take a policy run")
    if is_family_config(config):
        if overrides:
            raise CheckpointError(f"{directory}: a Hugging Face checkpoint takes no overrides ({', '.join(overrides)})")
        return load_family(directory, config, dtype=dtype, device=map_location, model_cls=cls)
    model = build_palm(cls, config, directory / CONFIG_NAME, **overrides)
    load_into(model, load_state_dict_file(directory / WEIGHTS_NAME), source=str(directory / WEIGHTS_NAME))
    dtype = parse_dtype(dtype)
    return model.to(map_location) if dtype is None else model.to(map_location, dtype)


def add_saved_scopes(model, ranks: dict, alphas: dict, targets: dict | None = None) -> None:
    """Recreate the scopes of a config.json record; a scope saved without an alpha
    (before alpha existed) gets alpha = r, the output scale 1 it was trained with."""
    for scope, r in ranks.items():
        model.add_finetune_params(scope, lora_r=r, lora_alpha=alphas.get(scope, r),
                                  targets=(targets or {}).get(scope, DEFAULT_LORA_TARGETS))


# ---------------------------------------------------------------- adapters


def save_adapter(model, scope: str, path) -> Path:
    """Save one LoRA scope alone (a small file, no base weights)."""
    model.require_scope(scope)
    prefix = f"finetune_modules.{scope}."
    tensors = {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    meta = {"scope": scope, "lora_r": str(model.finetune_scope_ranks[scope]),
            "lora_alpha": repr(model.finetune_scope_alphas[scope]),
            "lora_targets": ",".join(model.finetune_scope_targets[scope]),
            "dim": str(model.dim), "depth": str(len(model.layers))}
    path = Path(path)
    atomic_save_tensors(tensors, path, metadata=meta)
    return path


def load_adapter(model, path, scope: str | None = None) -> str:
    """Load an adapter file into `model`, creating the scope (default: the saved name)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such adapter file")
    meta = read_safetensors_header(path)[1]
    if "lora_r" not in meta:
        raise CheckpointError(f"{path}: not an adapter file (no lora_r metadata); write it with save_adapter")
    scope = scope or meta.get("scope", "default")
    if scope in model.finetune_modules:
        model.remove_finetune_params(scope)
    r = int(meta["lora_r"])
    targets = meta.get("lora_targets", ",".join(DEFAULT_LORA_TARGETS)).split(",")
    model.add_finetune_params(scope, lora_r=r, lora_alpha=float(meta.get("lora_alpha", r)), targets=targets)
    try:
        load_into(model.finetune_modules[scope], load_state_dict_file(path), source=str(path))
    except CheckpointError:
        model.remove_finetune_params(scope)
        raise
    return scope
