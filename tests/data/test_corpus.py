"""prepare: narrowest dtype, per-file validation tails, chunking never changes tokens, manifest, errors."""

import hashlib
import json

import numpy as np
import pytest

from palm_rlhf.cli.main import main
from palm_rlhf.data.corpus import iter_text, load_tokens, prepare_corpus, read_manifest, stdlib_files, token_dtype
from palm_rlhf.data.tokenizer import ByteTokenizer
from palm_rlhf.errors import DataError
from palm_rlhf.files import FILE_MODE


def test_token_dtype_is_the_narrowest():
    assert [token_dtype(v).name for v in (256, 257, 65536, 65537)] == ["uint8", "uint16", "uint16", "uint32"]


def test_split_tokens_and_manifest(tmp_path):
    """a.txt = 10 lines of 'aaaa\\n' (50 bytes), val_fraction 0.2 -> split at byte 40 (a line start):
    train = 40 bytes + EOS = 41 tokens, val = 10 bytes + EOS = 11; b.txt (6 bytes, one line) is all train."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("aaaa\n" * 10)
    (tmp_path / "src" / "b.txt").write_text("bbbbbb")
    (tmp_path / "src" / ".hidden").write_text("skip me")
    m = prepare_corpus([tmp_path / "src"], tmp_path / "out", ByteTokenizer(), val_fraction=0.2)
    assert [s["train_tokens"] for s in m["sources"]] == [41, 7] and [s["val_tokens"] for s in m["sources"]] == [11, 0]
    train, val = load_tokens(tmp_path / "out", "train"), load_tokens(tmp_path / "out", "val")
    assert train.dtype == np.uint8 and len(train) == 48 and bytes(val[:-1]) == b"aaaa\n" * 2 and val[-1] == 0
    assert m["sources"][0]["sha256"] == hashlib.sha256(b"aaaa\n" * 10).hexdigest()
    assert m["splits"]["train"]["sha256"] == hashlib.sha256(np.asarray(train).tobytes()).hexdigest()
    assert read_manifest(tmp_path / "out") == json.loads((tmp_path / "out" / "manifest.json").read_text())
    # published with the mode open() gives (0666 minus the umask), not a temporary's 0600
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes["train.bin"] == modes["val.bin"] == modes["manifest.json"] == FILE_MODE != 0o600


def test_small_chunks_give_identical_tokens(tmp_path):
    text = "".join(f"línea {i} ✓ " * (i % 5 + 1) + "\n" for i in range(300))  # multi-byte characters
    path = tmp_path / "t.txt"
    path.write_text(text)
    pieces = list(iter_text(path, chunk_bytes=7, split_at=len(text.encode()) // 2))
    assert "".join(t for t, _, _ in pieces) == text
    assert sum(n for _, n, _ in pieces) == len(text.encode())
    a = prepare_corpus([path], tmp_path / "big", ByteTokenizer(), chunk_bytes=1 << 20)
    b = prepare_corpus([path], tmp_path / "small", ByteTokenizer(), chunk_bytes=13)
    assert a["splits"] == b["splits"]


def test_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        prepare_corpus([tmp_path / "nope.txt"], tmp_path / "o", ByteTokenizer())
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        prepare_corpus([tmp_path / "empty.txt"], tmp_path / "o", ByteTokenizer())
    assert not (tmp_path / "o" / "train.bin").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not writable"):
        prepare_corpus([tmp_path / "file"], tmp_path / "file" / "sub", ByteTokenizer())


def test_stdlib_corpus_is_sorted_python(tmp_path):
    files = stdlib_files()
    assert len(files) > 100 and any(f.name == "os.py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert files == stdlib_files()  # deterministic


def test_cli_prepare_and_plot(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello world\n" * 50)
    assert main(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "d"), "--val-fraction", "0.1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dtype"] == "uint8" and out["train_tokens"] + out["val_tokens"] == 600 + 2
    assert main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "d2")]) == 2
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 3.0 / s, "lr": 0.1}) + "\n"
                                               for s in range(1, 5)))
    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path)]) == 2  # no metrics: a clear error, exit code 2
