"""Text corpora -> memory-mapped token files: `palm-rlhf prepare FILES_OR_DIRS --out DIR`.

Output directory:

    train.bin, val.bin     raw token ids, the narrowest unsigned dtype for the vocabulary
                           (uint8 for bytes, uint16 up to 65536 tokens, else uint32)
    manifest.json          dtype, token counts, bytes per split, tokenizer, and per source:
                           path, size, sha256 and how many tokens went to each split
    tokenizer_config.json  the tokenizer (+ tokenizer.json for BPE)

Files stream through in chunks of `chunk_bytes` cut at line breaks, so a corpus larger than
RAM works; only the output files grow. The last `val_fraction` of every file (cut at a line
break) is validation text, so even a single file gets a validation split; EOS (id 0) ends
every document in each split. The byte tokenizer stores each file's bytes exactly, UTF-8 or
not; tokenizers that read text refuse a file that is not UTF-8, naming the byte offset, unless
told to replace bad bytes with U+FFFD (`--replace-invalid-utf8`). The built-in corpus
`stdlib` is the Python standard library's `.py` files and doc texts (no tests, no
site-packages), in sorted order: no download needed.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import DataError
from ..files import atomic_write_bytes, create_temporary, unusable_dir_reason
from .tokenizer import ByteTokenizer

log = logging.getLogger(__name__)

__all__ = ["prepare_corpus", "resolve_sources", "stdlib_files", "read_manifest", "load_tokens", "token_dtype",
           "iter_chunks", "iter_text", "MANIFEST_NAME", "STDLIB"]

MANIFEST_NAME = "manifest.json"
STDLIB = "stdlib"
_DOC_SUFFIXES = {".txt", ".rst", ".md"}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype holding ids in [0, vocab_size)."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    raise DataError(f"vocab_size={vocab_size} is too large for uint32 token files")


def stdlib_files() -> list[Path]:
    """The built-in corpus: stdlib `.py` files and doc texts, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if _SKIP_DIRS & set(rel.parts[:-1]) or not p.is_file():
            continue
        if p.suffix == ".py" or p.suffix in _DOC_SUFFIXES:
            files.append(p)
    if not files:
        raise DataError(f"no standard-library sources under {root}; pass text files to prepare instead")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _looks_binary(path: Path) -> bool:
    with path.open("rb") as f:
        return b"\0" in f.read(8192)


def resolve_sources(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files and directories (recursively, sorted, hidden and binary files skipped), or `stdlib`."""
    inputs = [str(i) for i in inputs] or [STDLIB]
    files: list[Path] = []
    for item in inputs:
        if item == STDLIB and not Path(item).exists():
            files.extend(stdlib_files())
            continue
        path = Path(item)
        if not path.exists():
            raise DataError(f"{path}: no such file or directory; pass text files, directories, or 'stdlib'")
        if path.is_file():
            if not os.access(path, os.R_OK):
                raise DataError(f"{path}: not readable; check its permissions")
            files.append(path)
            continue
        found = []
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path)
            if any(part.startswith(".") for part in rel.parts) or not p.is_file():
                continue
            if not os.access(p, os.R_OK) or _looks_binary(p):
                log.warning("skipping %s (unreadable or binary)", p)
                continue
            found.append(p)
        if not found:
            raise DataError(f"{path}: directory has no readable text files")
        files.extend(found)
    return files


def iter_chunks(path: Path, chunk_bytes: int, split_at: int | None = None) -> Iterator[tuple[bytes, int, bool, bool]]:
    """Yield (bytes, file offset of the first, is_val, ends_split) chunks of a file, each ending at
    a line break where possible; the bytes are the file's, unaltered.

    Bytes before the first line start at or after `split_at` are training text, the rest
    validation text (`split_at=None`: everything is training text). `ends_split` marks the last
    chunk of the training part and of the file.
    """
    pos, carry, in_val = 0, b"", False
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    with f:
        while True:
            block = f.read(chunk_bytes)
            data = carry + block
            start = pos - len(carry)  # file offset of data[0]
            pos += len(block)
            if not in_val and split_at is not None and start + len(data) > split_at:
                cut = data.find(b"\n", max(0, split_at - start - 1))  # the first line start >= split_at
                if cut >= 0 or not block:  # the split line break, or end of file
                    cut = len(data) if cut < 0 else cut + 1
                    if cut:
                        yield data[:cut], start, False, True
                    data, start, in_val = data[cut:], start + cut, True
            if not block:
                if data:
                    yield data, start, in_val, True
                return
            nl = data.rfind(b"\n")
            if nl < 0 and len(data) < 4 * chunk_bytes:
                carry = data  # keep a very long line together a little longer
                continue
            nl = len(data) - 1 if nl < 0 else nl
            yield data[:nl + 1], start, in_val, False
            carry = data[nl + 1:]


def iter_text(path: Path, chunk_bytes: int, split_at: int | None = None,
              errors: str = "strict") -> Iterator[tuple[str, int, bool]]:
    """Yield (text, n_bytes, is_val) chunks of a file (see `iter_chunks`), decoded as UTF-8.

    Bytes that are not UTF-8 raise DataError naming the file and the byte offset; with
    `errors="replace"` they become U+FFFD instead.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    for data, offset, is_val, ends_split in iter_chunks(path, chunk_bytes, split_at):
        pending = len(decoder.getstate()[0])  # the start of a character cut by the previous chunk
        try:
            text = decoder.decode(data, final=ends_split)
        except UnicodeDecodeError as e:
            bad = e.object[e.start:e.end]
            raise DataError(f"{path}: not UTF-8 at byte offset {offset - pending + e.start} ({bad!r}); "
                            f"this tokenizer reads text: re-encode the file as UTF-8 (e.g. iconv -f latin1 "
                            f"-t utf-8), or accept U+FFFD for such bytes with `palm-rlhf prepare "
                            f"--replace-invalid-utf8` (the byte tokenizer keeps every byte as it is)") from None
        if ends_split:
            decoder.reset()
        yield text, len(data), is_val


@dataclass
class _SplitWriter:
    path: Path
    dtype: np.dtype
    tokens: int = 0
    bytes: int = 0

    def __post_init__(self):
        fd, tmp = create_temporary(self.path)
        self.tmp = Path(tmp)
        self.file = os.fdopen(fd, "wb")
        self.sha = hashlib.sha256()

    def write(self, ids: np.ndarray) -> None:
        if len(ids) and int(ids.max()) > np.iinfo(self.dtype).max:
            raise DataError(f"token id {int(ids.max())} does not fit {self.dtype}")
        raw = np.ascontiguousarray(ids, dtype=self.dtype).tobytes()
        self.file.write(raw)
        self.sha.update(raw)
        self.tokens += len(ids)

    def finish(self) -> str:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.sha.hexdigest()

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def prepare_corpus(inputs: Iterable[str], out_dir, tokenizer, val_fraction: float = 0.05,
                   chunk_bytes: int = 1 << 22, replace_invalid_utf8: bool = False) -> dict:
    """Tokenize `inputs` into `out_dir/{train,val}.bin` + manifest; returns the manifest.

    The byte tokenizer stores every file's bytes exactly, UTF-8 or not. Other tokenizers read
    text: a file that is not UTF-8 raises DataError naming it and the byte offset, unless
    `replace_invalid_utf8` (then such bytes become U+FFFD).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction}: must be in [0, 1)")
    out_dir = Path(out_dir)
    sources = resolve_sources(inputs)
    why = unusable_dir_reason(out_dir)
    if why is not None:
        raise DataError(f"output directory {out_dir} is not writable ({why}); choose another --out")
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    writers = {s: _SplitWriter(out_dir / f"{s}.bin", dtype) for s in ("train", "val")}
    records = []
    try:
        for path in sources:
            size = path.stat().st_size
            sha = hashlib.sha256()
            counts = {"train": 0, "val": 0}
            split_at = int(size * (1.0 - val_fraction)) if val_fraction > 0 else None
            if isinstance(tokenizer, ByteTokenizer):  # lossless: the file's bytes are the token ids
                pieces = ((np.frombuffer(data, dtype=np.uint8), len(data), is_val)
                          for data, _, is_val, _ in iter_chunks(path, chunk_bytes, split_at))
            else:
                errors = "replace" if replace_invalid_utf8 else "strict"
                pieces = ((tokenizer.encode_array(text), n_bytes, is_val)
                          for text, n_bytes, is_val in iter_text(path, chunk_bytes, split_at, errors))
            for ids, n_bytes, is_val in pieces:
                split = "val" if is_val else "train"
                writers[split].write(ids)
                writers[split].bytes += n_bytes
                counts[split] += len(ids)
            with path.open("rb") as f:  # hashed separately: iter_text may re-chunk
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
            for split, n in counts.items():
                if n:
                    writers[split].write(eos)  # end of document
                    counts[split] += 1
            records.append({"path": str(path), "bytes": size, "sha256": sha.hexdigest(),
                            "train_tokens": counts["train"], "val_tokens": counts["val"]})
        if writers["train"].tokens == 0:
            raise DataError(f"the corpus is empty: {len(sources)} file(s) hold no text; pass non-empty text files")
        digests = {f"{s}.bin": w.finish() for s, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    tokenizer.save(out_dir)
    manifest = {
        "format_version": 1,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokenizer": getattr(tokenizer, "kind", type(tokenizer).__name__),
        "val_fraction": val_fraction,
        "splits": {s: {"file": f"{s}.bin", "tokens": w.tokens, "bytes": w.bytes, "sha256": digests[f"{s}.bin"]}
                   for s, w in writers.items()},
        "sources": records,
    }
    atomic_write_bytes(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2).encode())
    log.info("prepared %d files: %d train / %d val tokens (%s) in %s", len(sources), writers["train"].tokens,
             writers["val"].tokens, dtype.name, out_dir)
    return manifest


def read_manifest(data_dir) -> dict:
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{data_dir}: no {MANIFEST_NAME}; run `palm-rlhf prepare ... --out {data_dir}` first")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest ({e}); re-run prepare") from e


def load_tokens(data_dir, split: str) -> np.memmap | np.ndarray:
    """A read-only memmap of one split's token ids (never loaded into RAM as a whole)."""
    manifest = read_manifest(data_dir)
    info = manifest["splits"].get(split)
    if info is None:
        raise DataError(f"{data_dir}: no {split!r} split in the manifest")
    path = Path(data_dir) / info["file"]
    dtype = np.dtype(manifest["dtype"])
    if not path.is_file() or path.stat().st_size != info["tokens"] * dtype.itemsize:
        raise DataError(f"{path}: missing or not {info['tokens']} {dtype.name} tokens as the manifest says; "
                        f"re-run prepare")
    if info["tokens"] == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")
