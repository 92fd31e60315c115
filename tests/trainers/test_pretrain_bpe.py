"""BPE end to end: `tokenizer train` -> `prepare --tokenizer` (uint16 ids) -> pretrain; the
checkpoint and final directory carry the BPE tokenizer and decode what it encodes."""

import json

import numpy as np
import pytest

from palm_rlhf.cli.main import main
from palm_rlhf.data.corpus import load_tokens
from palm_rlhf.data.tokenizer import BPETokenizer, load_tokenizer
from palm_rlhf.runtime.checkpoint import CheckpointManager

from pretrain_testing import TEXT, write_corpus


def test_bpe_tokenizer_travels_with_the_checkpoint(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    corpus = write_corpus(tmp_path)
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "320", "--out", str(tmp_path / "bpe")]) == 0
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "data"), "--tokenizer", str(tmp_path / "bpe")]) == 0
    capsys.readouterr()
    train = load_tokens(tmp_path / "data", "train")
    assert train.dtype == np.uint16 and len(train) < len(TEXT.encode()) * 0.9  # merges shorten the text
    code = main(["pretrain", f"out_dir={tmp_path / 'run'}", f"data.sources=[{tmp_path / 'data'}]", "model.dim=32",
                 "model.depth=1", "model.heads=2", "model.dim_head=16", "seq_len=16", "batch_size=2", "max_steps=2",
                 "eval.every=0", "progress=false", "device=cpu"])
    assert code == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2
    for directory in (CheckpointManager(tmp_path / "run").latest(), tmp_path / "run" / "final"):
        tok = load_tokenizer(directory)
        assert isinstance(tok, BPETokenizer) and tok.vocab_size == json.loads(
            (directory / "config.json").read_text())["num_tokens"]
        assert tok.decode(tok.encode("the lazy dog 42")) == "the lazy dog 42"
