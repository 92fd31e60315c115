"""`palm-rlhf info`: describe any checkpoint without running it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLES = """examples:
  palm-rlhf info runs/ppo                      # a run directory: its final/ (or, while training, its latest checkpoint)
  palm-rlhf info runs/sft runs/ppo runs/dpo    # several at once
  palm-rlhf info runs/pretrain/checkpoints/step_00000100
  palm-rlhf info runs/rm                       # a reward model
  palm-rlhf info actor.safetensors             # a LoRA adapter saved alone
  palm-rlhf info palm.pt --json                # a bare state dict (shape-inferred config)
"""


def register(sub) -> None:
    p = sub.add_parser("info", help="describe a checkpoint: config, parameters, scopes, tokenizer, step",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, nargs="+", help="run dir, step dir, save_pretrained dir, adapter or "
                   "state-dict file (several: described one after the other)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def _tensor_shapes(path: Path) -> tuple[dict, dict]:
    from ..files import read_safetensors_header  # CheckpointError naming a corrupt file

    return read_safetensors_header(path)


def _count(shapes: dict, exclude_prefix: str = "finetune_modules.", tied: bool = True) -> tuple[int, int]:
    import math

    base = sum(math.prod(s) for k, s in shapes.items() if not k.startswith(exclude_prefix) and "beta" not in k
               and not (tied and k == "to_logits.weight") and not k.endswith(("inv_freq", "rotary_emb.scale")))
    lora = sum(math.prod(s) for k, s in shapes.items() if k.startswith(exclude_prefix))
    return base, lora


def describe(path: Path) -> dict:
    from ..errors import CheckpointError, PalmRLHFError
    from ..model.checkpoint import read_config
    from ..files import load_state_dict_file
    from ..model.convert import infer_config, guess_gain_convention

    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    info: dict = {"path": str(path)}
    if path.is_file():
        if path.suffix == ".safetensors":
            shapes, meta = _tensor_shapes(path)
            if "lora_r" in meta:
                info.update(kind="lora adapter", scope=meta.get("scope"), lora_r=int(meta["lora_r"]),
                            parameters=sum(_count(shapes, "\0")))
                return info
        state = load_state_dict_file(path)
        config = infer_config(state)
        info.update(kind="state dict", layernorm_gain=guess_gain_convention(state),
                    scopes=config.pop("finetune_scopes"), config=config)
        info["parameters"], info["lora_parameters"] = _count({k: tuple(v.shape) for k, v in state.items()})
        return info

    from ..runtime.resolve import resolve_model

    source = resolve_model(path)
    directory = source.model_dir
    config = read_config(directory)
    if directory != path:
        info["resolved"] = str(directory)
    record = directory / "run.json"
    if record.is_file():
        try:
            info["run"] = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            info["run"] = "unreadable run.json"
    if config.get("model_type") == "reward_model":
        info.update(kind="reward model", reward=config.get("reward"))
        config = dict(config["palm"])
    elif "model_type" in config:
        info["kind"] = f"{config['model_type']} checkpoint (Hugging Face format)"
    elif config.get("family"):
        info["kind"] = f"{config['family']} model (palm-rlhf format; `palm-rlhf export` writes it for transformers)"
        config.pop("hf_config", None)
    else:
        info["kind"] = "PaLM"
    info["scopes"] = config.pop("finetune_scopes", {}) or {}
    info["config"] = {k: v for k, v in config.items() if k not in ("format_version", "layernorm_gain")}
    shapes = {}
    for weights in sorted(directory.glob("model*.safetensors")):
        shapes.update(_tensor_shapes(weights)[0])
    if shapes:
        info["parameters"], info["lora_parameters"] = _count(shapes, tied=config.get("tie_embeddings", True))
    if source.tokenizer_dir is None:
        info["tokenizer"] = "none saved (bytes assumed)"
    else:
        from ..data.tokenizer import load_tokenizer

        try:
            info["tokenizer"] = repr(load_tokenizer(source.tokenizer_dir))
        except PalmRLHFError as e:
            info["tokenizer"] = f"unreadable: {e}"
    adapter = directory / "adapter.safetensors"
    if adapter.is_file():
        meta = _tensor_shapes(adapter)[1]
        merged = "; merged into the weights above" if directory.name == "final" else ""
        info["adapter"] = f"{adapter.name} (scope {meta.get('scope')}, r={meta.get('lora_r')}{merged})"
    state_file = directory / "state.pt"
    if state_file.is_file():
        from ..runtime.checkpoint import CheckpointManager

        state = CheckpointManager(directory.parent, is_main=False).load(directory)  # read-only
        info["step"] = state.get("step")
    return info


def run(args) -> int:
    infos = [describe(path) for path in args.checkpoint]
    if args.json:
        print(json.dumps(infos[0] if len(infos) == 1 else infos, indent=2, default=str))
        return 0
    for info in infos:
        _print_text(info)
    return 0


def _print_text(info: dict) -> None:
    print(f"{info['path']}: {info['kind']}" + (f" (resolved to {info['resolved']})" if "resolved" in info else ""))
    for key in ("step", "parameters", "lora_parameters", "scope", "lora_r", "scopes", "tokenizer", "adapter",
                "layernorm_gain"):
        if key in info and info[key] not in (None, {}):
            value = f"{info[key]:,}" if isinstance(info[key], int) and key.endswith("parameters") else info[key]
            print(f"  {key:16s} {value}")
    for section in ("run", "config", "reward"):
        if isinstance(info.get(section), dict) and info[section]:
            print(f"  {section}:")
            for k, v in info[section].items():
                print(f"    {k:28s} {v}")
        elif info.get(section):
            print(f"  {section:16s} {info[section]}")
