"""`palm-rlhf generate`: sample text from a checkpoint directory."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..errors import ConfigError

EXAMPLES = """examples:
  palm-rlhf generate runs/sft --prompt "ROMEO:" --max-new-tokens 200 --top-p 0.9 --seed 0
  palm-rlhf generate runs/ppo --prompt "KING:" --stream --temperature 0.8
  palm-rlhf generate runs/sft --prompt "Q:\\nA:" --num-samples 4 --top-k 40 --stop "\\n\\n"
  palm-rlhf generate runs/sft --adapter runs/ppo/final/adapter.safetensors --prompt "Tell me"
  palm-rlhf generate runs/ppo/checkpoints/step_00000100 --prompt "Tell me"

CHECKPOINT is a run directory (its final/ is used), a final/ or save_pretrained directory, a
checkpoint step directory, or a Llama/Mistral/Qwen2/Qwen3 checkpoint directory (docs/models.md). The final/ of a LoRA, PPO, GRPO or DPO run already has its adapter
merged: generate from it as it is. --adapter applies a saved adapter (a file, or a directory
holding adapter.safetensors) to the model first. The tokenizer saved with the model is used
(--tokenizer overrides it); generation stops at its EOS id unless --no-eos is given.
Backslash escapes (\\n, \\t) are understood in --prompt and --stop.
"""


def register(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a trained checkpoint", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a run directory, a final/ or a checkpoint step directory")
    p.add_argument("--prompt", required=True, help="text to continue (backslash escapes like \\n are understood)")
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
    p.add_argument("--scope", default=None, help="LoRA scope saved in the checkpoint to apply (default: none)")
    p.add_argument("--adapter", type=Path, default=None, help="apply this adapter (adapter.safetensors, or a "
                   "directory holding one) to the model")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the one saved with the model)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype (bf16 is faster "
                   "on CPUs with bf16 units)")
    p.set_defaults(func=run)


def _unescape(text: str) -> str:
    return text.encode("latin-1", "backslashescape").decode("unicode_escape")


def load_model_and_tokenizer(path: Path, tokenizer: str | None = None, dtype=None):
    """(PaLM, tokenizer, ModelSource) for a run, final/, step or Hugging Face checkpoint directory; the byte
    tokenizer when none was saved."""
    from ..model import PaLM
    from ..runtime.resolve import check_tokenizer_fits, load_tokenizer_for, resolve_model

    source = resolve_model(path)
    model = PaLM.from_pretrained(source.model_dir, dtype=dtype)
    tok = load_tokenizer_for(source, tokenizer)
    check_tokenizer_fits(tok, model.num_tokens, str(path))
    return model, tok, source


def apply_adapter(model, source, path: Path) -> str:
    """Load the adapter at `path` into `model`; its scope name. Refuses one already merged into `source`."""
    from ..model.checkpoint import load_adapter
    from ..runtime.resolve import adapter_file

    return load_adapter(model, adapter_file(path, source))


def _check_scope(model, source, scope: str) -> None:
    from ..runtime.run import ADAPTER_NAME

    if scope in model.finetune_modules:
        return
    saved = ", ".join(repr(s) for s in model.finetune_modules) or "none"
    hint = "drop --scope"
    if (source.model_dir / ADAPTER_NAME).is_file():
        hint = (f"{source.model_dir} has its adapter merged in already, so drop --scope; to apply an adapter to "
                f"another model use --adapter {source.model_dir / ADAPTER_NAME}")
    raise ConfigError(f"--scope {scope}: {source.model_dir} has no LoRA scope {scope!r} (scopes saved: {saved}); "
                      f"{hint}")


def _print_stream(model, tokenizer, prompt_text, ids, config, scope) -> None:
    from ..generation import stream

    out = sys.stdout
    out.write(prompt_text)  # as typed: a BOS the tokenizer added is not text
    new, shown = [], 0
    for token in stream(model, ids, config, finetune_scope=scope):
        if token in config.eos_ids:
            break  # the EOS id is a control token, not text
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

    from ..data.tokenizer import encode_continuation
    from ..generation import SamplingConfig, generate

    if args.num_samples < 1:
        raise ConfigError(f"--num-samples {args.num_samples}: must be >= 1")
    if args.stream and args.num_samples != 1:
        raise ConfigError("--stream prints one sample; drop --num-samples or --stream")
    model, tokenizer, source = load_model_and_tokenizer(args.checkpoint, args.tokenizer, dtype=args.dtype)
    scope = args.scope
    if args.adapter is not None:
        if scope is not None:
            raise ConfigError("--adapter applies its own scope; drop --scope")
        scope = apply_adapter(model, source, args.adapter)
    elif scope is not None:
        _check_scope(model, source, scope)
    prompt_text = _unescape(args.prompt)
    ids = tokenizer.encode(prompt_text)
    if not ids:
        raise ConfigError("--prompt is empty; give at least one character to continue")
    try:
        config = SamplingConfig(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            min_p=args.min_p, repetition_penalty=args.repetition_penalty,
            eos_token=None if args.no_eos else list(tokenizer.eos_ids),
            stop_sequences=[encode_continuation(tokenizer, _unescape(s)) for s in args.stop if s],
            seed=args.seed)
    except ConfigError as e:  # name the CLI flag rather than the dataclass field
        flag = lambda m: f"--{m.group(1).replace('_', '-')} {m.group(2)}"  # noqa: E731
        raise ConfigError(re.sub(r"SamplingConfig\((\w+)=([^)]*)\)", flag, str(e))) from None

    prompt = torch.tensor(ids, dtype=torch.long)
    if args.stream:
        _print_stream(model, tokenizer, prompt_text, prompt, config, scope)
        return 0
    out = generate(model, [prompt] * args.num_samples, config, finetune_scope=scope)
    for i, row in enumerate(out.sequences()):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ({out.stop_reasons[i]}) ---")
        if not args.no_eos and row and row[-1] in tokenizer.eos_ids:
            row = row[:-1]  # the EOS id is a control token, not text
        print(prompt_text + tokenizer.decode(row))
    return 0
