"""Llama-family checkpoints (Llama, Mistral, Qwen2, Qwen3) as configuration of the one decoder.

A Hugging Face checkpoint directory (config.json with a `model_type`, model.safetensors or
shards with their index) becomes a `PaLM(block="sequential", ...)`: `family_kwargs` reads the
config, `hf_layout` says where each of our tensors lives in the checkpoint (q_proj, k_proj and
v_proj are rows of our fused `qkv`; up_proj and gate_proj of `gate_up`), `load_family` streams
the tensors into a model allocated once, and `export_family` / `export_adapter` write the
model (or one LoRA scope, as a peft adapter) back in transformers' names. No transformers
import: it is the reference in tests and benchmarks only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..files import atomic_save_tensors, atomic_write_bytes, load_plain, stream_safetensors
from .layers import ROPE_TYPES

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
PEFT_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
SAFE_NAME, INDEX_NAME, BIN_NAME = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"
SHARD_BYTES = 2 * 1024 ** 3  # export shards above this, as transformers does by default
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def is_family_config(config: dict) -> bool:
    """Whether a config.json is a Hugging Face model's (it names a `model_type` other than ours)."""
    return "model_type" in config and config.get("model_type") != "reward_model" and "block" not in config


def parse_dtype(dtype) -> torch.dtype | None:
    """None, a torch dtype, or a name (fp32, bf16, fp16) -> a torch dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in DTYPES:
        raise CheckpointError(f"dtype={dtype!r} is not one of fp32, bf16, fp16")
    return DTYPES[str(dtype).lower()]


def _rope(config: dict, source) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from either transformers 4's (`rope_theta`,
    `rope_scaling`) or 5's (`rope_parameters`) spelling."""
    params = dict(config.get("rope_parameters") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{source}: per-layer rope parameters are not supported")
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    scaling = dict(config.get("rope_scaling") or params)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if float(scaling.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))) != 1.0:
        raise CheckpointError(f"{source}: partial rotary embeddings are not supported")
    if kind == "default":
        return theta, None
    if kind not in ROPE_TYPES:
        raise CheckpointError(f"{source}: rope type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)} "
                              f"(see docs/models.md)")
    scaling = {"rope_type": kind, "factor": float(scaling["factor"]),
               **{k: scaling[k] for k in ("low_freq_factor", "high_freq_factor") if k in scaling}}
    if kind == "llama3":
        scaling["original_max_position_embeddings"] = int(
            (config.get("rope_scaling") or params).get("original_max_position_embeddings")
            or config.get("max_position_embeddings"))
    return theta, scaling


def family_kwargs(config: dict, source="config.json") -> dict:
    """A Hugging Face config.json -> `PaLM(**kwargs)` for the same model; one line for anything else."""
    family = config.get("model_type")
    if family not in FAMILIES:
        raise CheckpointError(f"{source}: model_type {family!r} is not supported; palm-rlhf runs the families "
                              f"{', '.join(FAMILIES)} and its own PaLM models (see docs/models.md)")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported (the {family} family uses silu)")
    try:
        dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        theta, scaling = _rope(config, source)
        window = None
        if family == "mistral":
            window = config.get("sliding_window")
        elif family in ("qwen2", "qwen3") and config.get("use_sliding_window"):
            window = config.get("sliding_window")
        bias = bool(config.get("attention_bias", False))
        return dict(
            dim=dim, num_tokens=int(config["vocab_size"]), depth=int(config["num_hidden_layers"]), heads=heads,
            dim_head=int(config.get("head_dim") or dim // heads), block="sequential",
            kv_heads=int(config.get("num_key_value_heads") or heads), ff_inner=int(config["intermediate_size"]),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or (family in ("llama", "qwen3") and bias),
            o_bias=family in ("llama", "qwen3") and bias, mlp_bias=family == "llama" and bool(config.get("mlp_bias")),
            qk_norm=family == "qwen3", rope_theta=theta, rope_scaling=scaling,
            sliding_window=int(window) if window else None, attn_dropout=float(config.get("attention_dropout", 0.0)),
            cross_entropy_ignore_index=-100, family=family, hf_config=config)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: not a valid {family} config ({type(e).__name__}: {e})") from e


def hf_layout(model) -> dict[str, list[tuple[str, int, int]]]:
    """{our tensor name: [(checkpoint name, first row, end row), ...]}: the checkpoint tensors
    stacked, in order, along dim 0 of ours."""
    layout = {"token_emb.weight": [("model.embed_tokens.weight", 0, model.num_tokens)],
              "norm.weight": [("model.norm.weight", 0, model.dim)]}
    if not model.tie_embeddings:
        layout["to_logits.weight"] = [("lm_head.weight", 0, model.num_tokens)]
    for i, blk in enumerate(model.layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        qd, kvd = blk.qkv_sizes[:2]
        qkv = [("q_proj", 0, qd), ("k_proj", qd, qd + kvd), ("v_proj", qd + kvd, qd + 2 * kvd)]
        ff = [("up_proj", 0, blk.ff_inner), ("gate_proj", blk.ff_inner, 2 * blk.ff_inner)]
        layout[ours + "attn_norm.weight"] = [(theirs + "input_layernorm.weight", 0, model.dim)]
        layout[ours + "ff_norm.weight"] = [(theirs + "post_attention_layernorm.weight", 0, model.dim)]
        for kind in ("weight", "bias"):
            if getattr(blk.qkv, kind) is not None:
                layout[ours + "qkv." + kind] = [(f"{theirs}self_attn.{n}.{kind}", a, b) for n, a, b in qkv]
            if getattr(blk.attn_out, kind) is not None:
                layout[ours + "attn_out." + kind] = [(f"{theirs}self_attn.o_proj.{kind}", 0, model.dim)]
            if getattr(blk.gate_up, kind) is not None:
                layout[ours + "gate_up." + kind] = [(f"{theirs}mlp.{n}.{kind}", a, b) for n, a, b in ff]
            if getattr(blk.ff_down, kind) is not None:
                layout[ours + "ff_down." + kind] = [(f"{theirs}mlp.down_proj.{kind}", 0, model.dim)]
        if blk.qk_norm:
            layout[ours + "q_norm.weight"] = [(theirs + "self_attn.q_norm.weight", 0, model.dim_head)]
            layout[ours + "k_norm.weight"] = [(theirs + "self_attn.k_norm.weight", 0, model.dim_head)]
    return layout


def _checkpoint_tensors(directory: Path):
    """Yield (name, tensor) for every tensor of a checkpoint directory, one at a time."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        for name in files:
            if not (directory / name).is_file():
                raise CheckpointError(f"{directory / name}: missing (named by {INDEX_NAME})")
            yield from stream_safetensors(directory / name)
    elif (directory / SAFE_NAME).is_file():
        yield from stream_safetensors(directory / SAFE_NAME)
    elif (directory / BIN_NAME).is_file():  # pickle only: read as plain tensors, never code
        fix = ("Convert it once with transformers: AutoModelForCausalLM.from_pretrained(DIR)"
               ".save_pretrained(DIR, safe_serialization=True)")
        yield from load_plain(directory / BIN_NAME, what="checkpoint", fix=fix).items()
    else:
        raise CheckpointError(f"{directory}: no {SAFE_NAME}, {INDEX_NAME} or {BIN_NAME} beside config.json")


def load_family(directory, config: dict, dtype=None, device="cpu", model_cls=None):
    """The model of a Hugging Face checkpoint directory: allocated once (built on the meta device,
    then `to_empty`), each checkpoint tensor copied into its rows and released before the next
    is read, so peak memory is the model plus about one tensor. `dtype` (default fp32)."""
    directory = Path(directory)
    kwargs = family_kwargs(config, directory / "config.json")
    dtype = parse_dtype(dtype) or torch.float32
    with torch.device("meta"):
        model = model_cls(**kwargs)
    model = model.to(dtype).to_empty(device=device)
    if model.tie_embeddings:  # to_empty gives each module its own tensor: tie them again
        model.to_logits.weight = model.token_emb.weight
    params = dict(model.named_parameters(remove_duplicate=False))
    targets = {}  # checkpoint name -> (our tensor, first row, end row)
    for ours, parts in hf_layout(model).items():
        for theirs, start, end in parts:
            targets[theirs] = (params[ours], start, end)
    filled, unexpected = set(), []
    with torch.no_grad():
        for name, tensor in _checkpoint_tensors(directory):
            if name not in targets:
                if not (name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and model.tie_embeddings)):
                    unexpected.append(name)
                continue
            param, start, end = targets[name]
            rows = param[start:end]
            if tuple(tensor.shape) != tuple(rows.shape):
                raise CheckpointError(f"{directory}: {name} has shape {tuple(tensor.shape)}, the config says "
                                      f"{tuple(rows.shape)}")
            rows.copy_(tensor)
            filled.add(name)
    missing = [n for n in targets if n not in filled]
    if missing or unexpected:
        parts = [f"missing: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}"] if missing else []
        parts += [f"unexpected: {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}"] if unexpected else []
        raise CheckpointError(f"{directory}: the weights do not match its config.json ({'; '.join(parts)})")
    return model


def export_family(model, out, dtype=None, shard_bytes: int = SHARD_BYTES, score=None, **config_updates) -> list[Path]:
    """Write `model` as a Hugging Face checkpoint: config.json (the family's with this model's sizes,
    then `config_updates`) and model.safetensors, sharded with an index above `shard_bytes`; with `score`
    (num_labels, dim) as `score.weight` and no lm_head (a *ForSequenceClassification's weights). LoRA
    scopes are not exported (merge them first, or write them with `export_adapter`)."""
    if getattr(model, "block", "parallel") != "sequential" or model.family not in FAMILIES:
        raise CheckpointError("a PaLM model has no transformers class: export writes Llama, Mistral and Qwen "
                              "family models; keep PaLM models in palm-rlhf's own format (save_pretrained)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = parse_dtype(dtype) or model.token_emb.weight.dtype
    state = dict(model.named_parameters(remove_duplicate=False))
    tensors = {}
    for ours, parts in hf_layout(model).items():
        for theirs, start, end in parts:
            tensors[theirs] = state[ours].detach()[start:end].to(dtype)
    if score is not None:  # transformers' GenericForSequenceClassification: model.* and score, no lm_head
        tensors.pop("lm_head.weight", None)
        tensors["score.weight"] = score.detach().to(dtype)
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = tensor, size + nbytes
    shards.append(current)
    written = []
    if len(shards) == 1:
        atomic_save_tensors(shards[0], out / SAFE_NAME, metadata={"format": "pt"})
        written.append(out / SAFE_NAME)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            atomic_save_tensors(shard, out / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            written.append(out / name)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_bytes(out / INDEX_NAME, json.dumps(index, indent=2).encode())
        written.append(out / INDEX_NAME)
    config = dict(model.config.get("hf_config") or {})
    config.update(model_type=model.family, architectures=[ARCHITECTURES[model.family]], vocab_size=model.num_tokens,
                  hidden_size=model.dim, num_hidden_layers=len(model.layers), num_attention_heads=model.heads,
                  num_key_value_heads=model.kv_heads, head_dim=model.dim_head,
                  intermediate_size=model.layers[0].ff_inner, tie_word_embeddings=model.tie_embeddings,
                  dtype=str(dtype).removeprefix("torch."))
    config.update(config_updates)
    config.pop("torch_dtype", None)
    atomic_write_bytes(out / "config.json", json.dumps(config, indent=2).encode())
    written.append(out / "config.json")
    return written


def export_adapter(model, scope: str, out, base_model: str | None = None) -> list[Path]:
    """Write one LoRA scope as a peft adapter (adapter_config.json + adapter_model.safetensors)
    that `peft.PeftModel.from_pretrained(base, out)` loads onto the base model.

    Ours adds (x A B) * alpha / r with A (in, r) and B (r, out); peft adds
    lora_B(lora_A(x)) * lora_alpha / r with weights (r, in) and (out, r): A^T and B^T."""
    if getattr(model, "block", "parallel") != "sequential" or model.family not in FAMILIES:
        raise CheckpointError("a PaLM model has no transformers class, so no peft adapter either: --adapter-only "
                              "writes Llama, Mistral and Qwen family scopes")
    model.require_scope(scope)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, lora_set in enumerate(model.finetune_modules[scope]):
        for target, lora in lora_set.by_target().items():
            prefix = f"base_model.model.model.layers.{i}.{PEFT_NAMES[target]}"
            tensors[prefix + ".lora_A.weight"] = lora.A.detach().t().contiguous()
            tensors[prefix + ".lora_B.weight"] = lora.B.detach().t().contiguous()
    atomic_save_tensors(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    targets = model.finetune_scope_targets[scope]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": model.finetune_scope_ranks[scope],
              "lora_alpha": model.finetune_scope_alphas[scope], "lora_dropout": 0.0, "bias": "none",
              "target_modules": sorted(PEFT_NAMES[t].split(".")[-1] for t in targets),
              "base_model_name_or_path": base_model, "fan_in_fan_out": False, "inference_mode": True,
              "use_rslora": False, "init_lora_weights": True, "modules_to_save": None}
    atomic_write_bytes(out / "adapter_config.json", json.dumps(config, indent=2).encode())
    return [out / "adapter_model.safetensors", out / "adapter_config.json"]
