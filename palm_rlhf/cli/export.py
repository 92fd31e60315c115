"""`palm-rlhf export`: a run, final/ or family checkpoint -> a Hugging Face checkpoint (or a peft adapter)."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  palm-rlhf export runs/sft hf/sft                       # the run's final/: merged weights, tokenizer
  palm-rlhf export runs/dpo hf/dpo --dtype bf16          # half the bytes
  palm-rlhf export runs/sft hf/sft-adapter --adapter-only  # the LoRA scope alone, for peft
  palm-rlhf export runs/rm hf/rm                         # a reward model (pooling=sequence_classification)

SOURCE is a run directory (its final/), a final/ or checkpoint step directory, or a Llama, Mistral,
Qwen2 or Qwen3 checkpoint directory. OUT gets config.json (the same model_type), model.safetensors
(sharded above 2 GB, with model.safetensors.index.json), the tokenizer files and
generation_config.json: transformers.AutoModelForCausalLM.from_pretrained(OUT) loads it. A LoRA
run's final/ already has its adapter merged. --adapter-only writes the run's adapter
(adapter.safetensors) as adapter_config.json + adapter_model.safetensors for
peft.PeftModel.from_pretrained(base, OUT), where base is the model the run started from.
A PaLM model has no transformers class and is refused.

A reward model (`reward train`) on a Llama, Mistral or Qwen base trained with
pooling=sequence_classification exports as the family's *ForSequenceClassification (num_labels 1,
its LoRA merged): transformers.AutoModelForSequenceClassification.from_pretrained(OUT) scores what
`reward score` scores. Other poolings, rating-bin heads and PaLM bases have no transformers class.
"""

GENERATION_CONFIG = "generation_config.json"


def register(sub) -> None:
    p = sub.add_parser("export", help="write a run or checkpoint as a Hugging Face checkpoint (or peft adapter)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="a run, final/, checkpoint step or family checkpoint directory")
    p.add_argument("out", type=Path, help="a new (or empty) output directory")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype of the written weights (default: as loaded, fp32)")
    p.add_argument("--adapter-only", action="store_true", help="write the run's LoRA adapter as a peft adapter")
    p.set_defaults(func=run)


def _check_out(out: Path) -> None:
    from ..files import unusable_dir_reason

    if out.exists() and out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"{out}: not empty; export into a new or empty directory")
    why = unusable_dir_reason(out)
    if why:
        raise ConfigError(f"{out} cannot be used: {why}; choose another output directory")


def _base_model(source) -> str | None:
    """The `model=` the run started from (its config.yaml), for the adapter's base_model_name_or_path."""
    import yaml

    config = source.run_dir / "config.yaml" if source.run_dir is not None else None
    if config is None or not config.is_file():
        return None
    try:
        return (yaml.safe_load(config.read_text()) or {}).get("model")
    except yaml.YAMLError:
        return None


def _generation_config(model, source_dir: Path, out: Path) -> None:
    """Copy the source's generation_config.json, or write one from the family config's token ids."""
    if (source_dir / GENERATION_CONFIG).is_file():
        shutil.copyfile(source_dir / GENERATION_CONFIG, out / GENERATION_CONFIG)
        return
    hf = model.config.get("hf_config") or {}
    ids = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
    (out / GENERATION_CONFIG).write_text(json.dumps(ids, indent=2) + "\n")


def _pad_token_id(model, tokenizer) -> int:
    """The id transformers' *ForSequenceClassification reads as padding (it scores each row's rightmost
    token that is not this id): the base's pad_token_id, else the tokenizer's padding, else EOS."""
    hf = model.config.get("hf_config") or {}
    pad = hf.get("pad_token_id")
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_id
    if pad is None:
        pad = hf.get("eos_token_id")
        pad = pad[0] if isinstance(pad, list) else pad
    return 0 if pad is None else int(pad)


def _export_reward(args, source) -> int:
    """A reward model trained with pooling=sequence_classification -> the family's *ForSequenceClassification."""
    from ..model.families import ARCHITECTURES, export_family
    from ..model.reward import RewardModel
    from ..runtime.resolve import load_tokenizer_for

    rm = RewardModel.from_pretrained(source.model_dir)
    where, palm = source.model_dir, rm.palm
    if palm.block != "sequential" or palm.family not in ARCHITECTURES:
        raise ConfigError(f"{where}: a reward model on a PaLM base has no transformers class; export writes reward "
                          f"models on a Llama, Mistral or Qwen base trained with pooling=sequence_classification "
                          f"(keep this one in palm-rlhf's format: reward score, ppo reward_model=)")
    arch = ARCHITECTURES[palm.family].removesuffix("CausalLM") + "SequenceClassification"
    if rm.pooling != "sequence_classification" or rm.binned_output:
        what = f"pooling={rm.pooling}" if rm.pooling != "sequence_classification" else "a rating-bin head"
        raise ConfigError(f"{where}: a reward model with {what} has no transformers class; only a scalar head with "
                          f"pooling=sequence_classification exports (as {arch}): retrain with `palm-rlhf reward "
                          f"train ... pooling=sequence_classification` (objective pairwise or mse)")
    if args.adapter_only:
        raise ConfigError(f"{where}: --adapter-only writes a causal LM's LoRA scope, but a reward model's score head "
                          f"is trained from scratch, so no base checkpoint holds it; drop --adapter-only to export "
                          f"the whole reward model with its LoRA merged")
    if rm.reward_lora_scope is not None:
        log.info("merging the reward LoRA scope %r into the exported weights", rm.reward_lora_scope)
        palm.merge_finetune_params(rm.reward_lora_scope)
    tokenizer = load_tokenizer_for(source) if source.tokenizer_dir is not None else None
    pad = _pad_token_id(palm, tokenizer)
    written = export_family(palm, args.out, dtype=args.dtype, score=rm.to_pred[0].weight, architectures=[arch],
                            num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, pad_token_id=pad)
    if tokenizer is not None:
        tokenizer.save(args.out)
    size = sum(p.stat().st_size for p in written if p.suffix == ".safetensors")
    print(f"wrote {args.out}: {arch} (num_labels 1, pad_token_id {pad}), {size / 1e6:.1f} MB; load it with "
          f"transformers.AutoModelForSequenceClassification.from_pretrained({str(args.out)!r})")
    return 0


def run(args) -> int:
    from ..model import PaLM
    from ..model.checkpoint import load_adapter, read_config
    from ..model.families import export_adapter, export_family
    from ..runtime.resolve import ADAPTER_NAME, load_tokenizer_for, resolve_model

    source = resolve_model(args.source)
    _check_out(args.out)
    if read_config(source.model_dir).get("model_type") == "reward_model":
        return _export_reward(args, source)
    model = PaLM.from_pretrained(source.model_dir, dtype=args.dtype)
    if args.adapter_only:
        adapter = source.model_dir / ADAPTER_NAME
        if not adapter.is_file():
            raise ConfigError(f"{source.model_dir}: no {ADAPTER_NAME} (only LoRA runs have one); "
                              f"drop --adapter-only to export the whole model")
        scope = load_adapter(model, adapter)
        written = export_adapter(model, scope, args.out, base_model=_base_model(source))
        print(f"wrote {args.out}: a peft LoRA adapter (r={model.finetune_scope_ranks[scope]}, "
              f"targets {', '.join(model.finetune_scope_targets[scope])}); load it with "
              f"peft.PeftModel.from_pretrained(base, {str(args.out)!r})")
        return 0
    scopes = list(model.finetune_modules)
    if len(scopes) > 1:
        raise ConfigError(f"{source.model_dir} holds LoRA scopes {scopes}; export merges one: merge the one you "
                          f"want with PaLM.merge_finetune_params and save_pretrained, then export that")
    for scope in scopes:
        log.info("merging LoRA scope %r into the exported weights", scope)
        model.merge_finetune_params(scope)
    written = export_family(model, args.out, dtype=args.dtype)
    if source.tokenizer_dir is not None:
        load_tokenizer_for(source).save(args.out)
    _generation_config(model, source.model_dir, args.out)
    size = sum(p.stat().st_size for p in written if p.suffix == ".safetensors")
    print(f"wrote {args.out}: {model.family} checkpoint, {model.num_parameters():,} parameters, "
          f"{size / 1e6:.1f} MB in {sum(p.suffix == '.safetensors' for p in written)} file(s); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(args.out)!r})")
    return 0
