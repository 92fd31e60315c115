"""`palm-rlhf convert`: palm-rlhf-pytorch checkpoints (or one of our runs) -> a save_pretrained directory."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """examples:
  palm-rlhf convert palm.pt converted/                 # guess the format from the gains
  palm-rlhf convert palm.pt converted/ --from 0.8      # palm-rlhf-pytorch 0.8.x
  palm-rlhf convert encoder.pt out/ --non-causal
  palm-rlhf convert runs/ppo exported/                 # a run (final/) or step directory, with its tokenizer
"""


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a palm-rlhf-pytorch state dict into a checkpoint directory",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="a .pt or .safetensors state dict saved by palm-rlhf-pytorch, or a "
                   "run, final/ or checkpoint step directory")
    p.add_argument("out", type=Path, help="output directory (config.json + model.safetensors)")
    p.add_argument("--from", dest="source_format", choices=["auto", "0.8", "seed"], default="auto",
                   help="0.8: LayerNorm gains stored as offsets from 1; seed: absolute gains (default: guess)")
    p.add_argument("--non-causal", action="store_true", help="the model was built with causal=False")
    p.set_defaults(func=run)


def _check_out(out: Path) -> None:
    """The shared writable-directory check (as every trainer's out_dir and `data prepare --out` have),
    run once the source has loaded: a bad source leaves no output directory behind."""
    from ..errors import ConfigError
    from ..files import unusable_dir_reason

    why = unusable_dir_reason(out)
    if why is not None:
        raise ConfigError(f"output directory {out} cannot be used ({why}); choose another OUT")


def _export_directory(args) -> int:
    """A run, final/ or step directory -> a standalone save_pretrained directory with its tokenizer."""
    from ..model import PaLM
    from ..runtime.resolve import load_tokenizer_for, resolve_model

    source = resolve_model(args.source)
    model = PaLM.from_pretrained(source.model_dir)
    _check_out(args.out)
    model.save_pretrained(args.out)
    if source.tokenizer_dir is not None:
        load_tokenizer_for(source).save(args.out)
    print(f"wrote {args.out} from {source.model_dir} ({model.num_parameters():,} parameters, "
          f"tokenizer: {'saved' if source.tokenizer_dir is not None else 'none (bytes)'})")
    return 0


def run(args) -> int:
    if args.source.is_dir():
        return _export_directory(args)
    from ..model import PaLM
    from ..model.checkpoint import load_into
    from ..files import load_state_dict_file
    from ..model.convert import convert_state_dict, infer_config

    state = convert_state_dict(load_state_dict_file(args.source), args.source_format)
    config = infer_config(state, causal=not args.non_causal)
    scopes = config.pop("finetune_scopes")
    model = PaLM(**config)
    for scope, r in scopes.items():
        model.add_finetune_params(scope, lora_r=r)
    load_into(model, state, source=str(args.source))
    _check_out(args.out)
    model.save_pretrained(args.out)
    print(f"wrote {args.out} ({model.num_parameters():,} parameters, scopes: {list(scopes) or 'none'})")
    return 0
