"""A corpus that is not UTF-8 is never silently altered (issue 16, item 6).

The byte tokenizer stores the file's bytes exactly; a tokenizer that reads text stops with one
line naming the file and the byte offset of the first bad byte, unless told to replace.
"""

from __future__ import annotations

import numpy as np
import pytest

from palm_rlhf.cli.main import main
from palm_rlhf.data.corpus import iter_text, load_tokens, prepare_corpus
from palm_rlhf.data.tokenizer import ByteTokenizer, train_bpe
from palm_rlhf.errors import DataError

# valid multi-byte characters around Latin-1 bytes (0xe9, 0xff) that are not UTF-8
GOOD = "línea ✓ {}\n"
BAD_LINE = b"caf\xe9 cr\xe8me \xff\n"


def latin1_corpus(path, bad_at_line: int = 37) -> int:
    """Write 60 lines, line `bad_at_line` holding Latin-1 bytes; return the offset of the first bad byte."""
    lines = [GOOD.format(i).encode() for i in range(60)]
    lines[bad_at_line] = BAD_LINE
    path.write_bytes(b"".join(lines))
    return sum(len(x) for x in lines[:bad_at_line]) + BAD_LINE.index(b"\xe9")


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 5])
def test_byte_tokenizer_keeps_every_byte(tmp_path, chunk_bytes):
    latin1_corpus(tmp_path / "l1.txt")
    data = (tmp_path / "l1.txt").read_bytes()
    prepare_corpus([tmp_path / "l1.txt"], tmp_path / "out", ByteTokenizer(), val_fraction=0.3,
                   chunk_bytes=chunk_bytes)
    train, val = load_tokens(tmp_path / "out", "train"), load_tokens(tmp_path / "out", "val")
    assert train[-1] == 0 and val[-1] == 0  # EOS ends each split's document
    assert bytes(np.concatenate([train[:-1], val[:-1]])) == data  # not one byte replaced by U+FFFD


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    pytest.importorskip("tokenizers")
    directory = tmp_path_factory.mktemp("bpe")
    train_bpe([GOOD.format(i) for i in range(200)], vocab_size=300, min_frequency=1).save(directory)
    return directory


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 7])
def test_text_tokenizer_names_file_and_byte_offset(tmp_path, chunk_bytes):
    offset = latin1_corpus(tmp_path / "l1.txt")
    with pytest.raises(DataError) as e:
        list(iter_text(tmp_path / "l1.txt", chunk_bytes))
    assert f"l1.txt: not UTF-8 at byte offset {offset} (b'\\xe9')" in str(e.value)
    assert "--replace-invalid-utf8" in str(e.value) and "\n" not in str(e.value)


def test_cli_prepare_with_bpe_fails_in_one_line_or_replaces_when_asked(tmp_path, capsys, bpe_dir):
    offset = latin1_corpus(tmp_path / "l1.txt")
    args = ["prepare", str(tmp_path / "l1.txt"), "--tokenizer", str(bpe_dir), "--out", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'l1.txt'}: not UTF-8 at byte offset {offset}")
    assert not (tmp_path / "out" / "train.bin").exists()

    assert main(args + ["--replace-invalid-utf8"]) == 0
    capsys.readouterr()
    from palm_rlhf.data.tokenizer import load_tokenizer

    ids = np.concatenate([load_tokens(tmp_path / "out", s)[:-1] for s in ("train", "val")])
    text = load_tokenizer(tmp_path / "out").decode(ids.tolist())
    assert "caf\ufffd cr\ufffdme \ufffd\n" in text and GOOD.format(59) in text


def test_offset_counts_a_character_cut_between_chunks(tmp_path):
    """A 62-byte line has no line break to cut at, so chunks of 5 bytes end inside a 3-byte ✓;
    the decoder holds those bytes back, and the offset of the bad byte must still be exact (60)."""
    (tmp_path / "long.txt").write_bytes("✓".encode() * 20 + b"\xe9\n")
    for chunk_bytes in (5, 1 << 20):
        with pytest.raises(DataError, match=r"long\.txt: not UTF-8 at byte offset 60 \(b'\\xe9'\)"):
            list(iter_text(tmp_path / "long.txt", chunk_bytes))
    assert "".join(t for t, _, _ in iter_text(tmp_path / "long.txt", 5, errors="replace")) == "✓" * 20 + "\ufffd\n"
