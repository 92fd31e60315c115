"""`palm-rlhf prepare`: tokenize text files into memory-mapped train/val token files."""

from __future__ import annotations

import argparse
import json

EXAMPLES = """examples:
  palm-rlhf prepare stdlib --out data/stdlib                 # the built-in corpus: Python's standard library
  palm-rlhf prepare ../shared/data/tinyshakespeare.txt --out data/shakespeare --val-fraction 0.1
  palm-rlhf prepare notes/ books/*.txt --out data/mine --tokenizer runs/bpe   # a trained BPE tokenizer

Writes OUT/train.bin and OUT/val.bin (uint8 for bytes, uint16/uint32 for larger vocabularies), the
tokenizer, and OUT/manifest.json (sources with sizes and sha256, token counts). Files stream through
in chunks, so corpora larger than RAM work. The last --val-fraction of every file is validation text.
Use the directory as `data.sources=[OUT]` in `palm-rlhf pretrain`.
"""


def register(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize text into memory-mapped train/val token files", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="text files, directories (recursive), or 'stdlib' (the default)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", default="byte", help="'byte' (default) or a directory with a saved tokenizer")
    p.add_argument("--val-fraction", type=float, default=0.05, help="tail of each file kept for validation")
    p.add_argument("--replace-invalid-utf8", action="store_true",
                   help="BPE tokenizers: read bytes that are not UTF-8 as U+FFFD instead of stopping with an error "
                        "(the byte tokenizer always keeps every byte)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data.corpus import prepare_corpus
    from ..trainers.pretrain import tokenizer_from

    manifest = prepare_corpus(args.inputs or ["stdlib"], args.out, tokenizer_from(args.tokenizer),
                              val_fraction=args.val_fraction, replace_invalid_utf8=args.replace_invalid_utf8)
    print(json.dumps({"out": args.out, "files": len(manifest["sources"]), "dtype": manifest["dtype"],
                      **{f"{k}_tokens": v["tokens"] for k, v in manifest["splits"].items()}}))
    return 0
