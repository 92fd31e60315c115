"""`palm-rlhf generate`: sample text from a checkpoint directory."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..errors import CheckpointError, ConfigError

EXAMPLES = """examples:
  palm-rlhf generate runs/sft/final --prompt "ROMEO:" --max-new-tokens 200 --top-p 0.9 --seed 0
  palm-rlhf generate runs/sft/final --prompt "KING:" --stream --temperature 0.8
  palm-rlhf generate runs/sft/final --prompt "Q:" --num-samples 4 --top-k 40 --stop "\\n\\n"
  palm-rlhf generate runs/ppo/final --prompt "Tell me" --scope actor   # with a LoRA scope

CHECKPOINT is a directory written by save_pretrained (config.json + model.safetensors).
If it holds a saved tokenizer (tokenizer_config.json) that one is used; otherwise text
is UTF-8 bytes (the byte tokenizer). Generation stops at the tokenizer's EOS id (0)
unless --no-eos is given.
"""


def register(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a trained checkpoint", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a save_pretrained directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per sample (default 128)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus: keep the smallest set reaching p (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x p(top token) (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop after this text (repeatable; backslash escapes like \\n are understood)")
    p.add_argument("--no-eos", action="store_true", help="do not stop at the tokenizer's EOS id")
    p.add_argument("--seed", type=int, default=None, help="seed for repeatable sampling")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples of the prompt (batched)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are produced (one sample)")
    p.add_argument("--scope", default=None, help="LoRA finetune scope to apply (default: base weights)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype (bf16 is faster "
                   "on CPUs with bf16 units)")
    p.set_defaults(func=run)


def _unescape(text: str) -> str:
    return text.encode("latin-1", "backslashescape").decode("unicode_escape")


def load_model_and_tokenizer(directory: Path):
    """(PaLM, tokenizer) from a checkpoint dir; the byte tokenizer when none was saved."""
    from ..data.tokenizer import load_tokenizer_or_bytes
    from ..model import PaLM

    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: no config.json; pass a directory written by save_pretrained "
                              f"(or convert a seed .pt file with `palm-rlhf convert`)")
    model = PaLM.from_pretrained(directory)
    tokenizer = load_tokenizer_or_bytes(directory)
    if tokenizer.vocab_size > model.num_tokens:
        raise CheckpointError(f"{directory}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                              f"{model.num_tokens} (num_tokens); they do not belong together")
    return model, tokenizer


def _print_stream(model, tokenizer, ids, config, scope) -> None:
    from ..generation import stream

    out = sys.stdout
    out.write(tokenizer.decode(ids))
    new, shown = [], 0
    for token in stream(model, ids, config, finetune_scope=scope):
        new.append(token)
        text = tokenizer.decode(new)
        # hold back a trailing partial UTF-8 character until its last byte arrives
        stable = len(text) - 1 if text.endswith("\ufffd") else len(text)
        if stable > shown:
            out.write(text[shown:stable])
            out.flush()
            shown = stable
    out.write(tokenizer.decode(new)[shown:] + "\n")
    out.flush()


def run(args) -> int:
    import torch

    from ..generation import SamplingConfig, generate

    if args.num_samples < 1:
        raise ConfigError(f"--num-samples {args.num_samples}: must be >= 1")
    if args.stream and args.num_samples != 1:
        raise ConfigError("--stream prints one sample; drop --num-samples or --stream")
    model, tokenizer = load_model_and_tokenizer(args.checkpoint)
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ConfigError("--prompt is empty; give at least one character to continue")
    try:
        config = SamplingConfig(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            min_p=args.min_p, repetition_penalty=args.repetition_penalty,
            eos_token=None if args.no_eos else tokenizer.eos_id,
            stop_sequences=[tokenizer.encode(_unescape(s)) for s in args.stop if s], seed=args.seed)
    except ConfigError as e:  # name the CLI flag rather than the dataclass field
        flag = lambda m: f"--{m.group(1).replace('_', '-')} {m.group(2)}"  # noqa: E731
        raise ConfigError(re.sub(r"SamplingConfig\((\w+)=([^)]*)\)", flag, str(e))) from None

    prompt = torch.tensor(ids, dtype=torch.long)
    if args.stream:
        _print_stream(model, tokenizer, prompt, config, args.scope)
        return 0
    out = generate(model, [prompt] * args.num_samples, config, finetune_scope=args.scope)
    for i, row in enumerate(out.sequences()):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ({out.stop_reasons[i]}) ---")
        if not args.no_eos and row and row[-1] == tokenizer.eos_id:
            row = row[:-1]  # the EOS id is a control token, not text
        print(args.prompt + tokenizer.decode(row))
    return 0
