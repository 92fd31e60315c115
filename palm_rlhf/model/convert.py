"""Convert palm-rlhf-pytorch checkpoints to ours.

palm-rlhf-pytorch 0.8.x stores each LayerNorm gain as an offset from 1
(`F.layer_norm(x, ..., gamma + 1)`); the seed and this library store the gain
itself. Every other tensor is identical. `infer_config` reads the model shape
back from the tensors, so a bare state dict is enough.
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError


def is_gain_key(key: str) -> bool:
    return key.endswith("norm.gamma")


def v08_to_ours(state: dict) -> dict:
    """0.8.x state dict (gain offsets) -> ours (absolute gains)."""
    return {k: (v + 1 if is_gain_key(k) else v) for k, v in state.items()}


def ours_to_v08(state: dict) -> dict:
    return {k: (v - 1 if is_gain_key(k) else v) for k, v in state.items()}


def infer_config(state: dict, causal: bool = True) -> dict:
    """Recover PaLM constructor arguments from a state dict's shapes."""
    try:
        num_tokens, dim = state["token_emb.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
        fused = state["layers.0.fn.fused_attn_ff_proj.weight"].shape[0]
        attn_inner = state["layers.0.fn.attn_out.weight"].shape[1]
        ff_inner = state["layers.0.fn.ff_out.2.weight"].shape[1]
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"not a PaLM state dict (cannot find {e}); expected keys like "
                              f"'token_emb.weight' and 'layers.0.fn.fused_attn_ff_proj.weight'") from e
    dim_head = (fused - attn_inner - 2 * ff_inner) // 2
    if dim_head <= 0 or attn_inner % dim_head or ff_inner % dim:
        raise CheckpointError("state dict shapes are inconsistent with a PaLM block")
    config = dict(dim=int(dim), num_tokens=int(num_tokens), depth=depth, dim_head=int(dim_head),
                  heads=int(attn_inner // dim_head), ff_mult=int(ff_inner // dim), causal=causal,
                  qk_rmsnorm="layers.0.fn.q_scale" in state)
    scopes = {}
    for k, v in state.items():
        if k.startswith("finetune_modules.") and k.endswith(".0.0.A"):
            scopes[k.split(".")[1]] = int(v.shape[1])
    config["finetune_scopes"] = scopes
    return config


def guess_gain_convention(state: dict) -> str:
    """'offset' (0.8.x) when the LayerNorm gains sit near 0, else 'absolute'."""
    gains = [v.float().mean().item() for k, v in state.items() if is_gain_key(k)]
    if not gains:
        raise CheckpointError("no LayerNorm gains (keys ending in 'norm.gamma') in this state dict: not a PaLM "
                              "state dict? Expected keys like 'token_emb.weight' and 'layers.0.fn.norm.gamma'")
    return "offset" if sum(gains) / len(gains) < 0.5 else "absolute"


def convert_state_dict(state: dict, source: str = "auto") -> dict:
    """source: '0.8' (gain offsets), 'seed' (absolute gains) or 'auto' (guess from the values)."""
    if source == "auto":
        source = "0.8" if guess_gain_convention(state) == "offset" else "seed"
    if source not in ("0.8", "seed"):
        raise CheckpointError(f"unknown source format {source!r}; use '0.8', 'seed' or 'auto'")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return v08_to_ours(state) if source == "0.8" else state
