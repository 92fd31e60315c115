"""`palm-rlhf tokenizer train`: train a byte-level BPE tokenizer on a corpus."""

from __future__ import annotations

import argparse
import json

EXAMPLES = """examples:
  palm-rlhf tokenizer train ../shared/data/tinyshakespeare.txt --vocab-size 2048 --out runs/bpe-shakespeare
  palm-rlhf tokenizer train stdlib --vocab-size 8192 --out runs/bpe-stdlib
  palm-rlhf prepare corpus/ --out data/corpus --tokenizer runs/bpe-stdlib   # then use it

The tokenizer is byte-level (lossless on any text) with EOS at id 0. Every checkpoint saves the
tokenizer it was trained with, so generation always decodes with the right one.
Needs the `tokenizers` package: pip install 'palm-rlhf[bpe]'.
"""


def register(sub) -> None:
    group = sub.add_parser("tokenizer", help="train a BPE tokenizer on your corpus", epilog=EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = group.add_subparsers(dest="tokenizer_command", metavar="ACTION", title="actions")
    group.set_defaults(func=lambda args: (group.print_help(), 2)[1])
    t = actions.add_parser("train", help="train byte-level BPE", epilog=EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("inputs", nargs="*", help="text files, directories, or 'stdlib' (the default)")
    t.add_argument("--out", required=True, help="directory to save the tokenizer in")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--min-frequency", type=int, default=2, help="merges must occur at least this often")
    t.set_defaults(func=run_train)


def run_train(args) -> int:
    from ..data.corpus import iter_text, resolve_sources
    from ..data.tokenizer import train_bpe

    files = resolve_sources(args.inputs or ["stdlib"])
    texts = (text for f in files for text, _, _ in iter_text(f, 1 << 20))
    tok = train_bpe(texts, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    tok.save(args.out)
    print(json.dumps({"out": args.out, "vocab_size": tok.vocab_size, "files": len(files)}))
    return 0
