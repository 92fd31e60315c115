"""Tokenizers: UTF-8 bytes (the default) and byte-level BPE through Hugging Face `tokenizers`.

Both share one interface: `vocab_size`, `eos_id`, `pad_id`, `encode(str) -> list[int]`,
`encode_array(str) -> np.ndarray`, `decode(ids) -> str`, `save(dir)`; `load_tokenizer(dir)`
reads either back. Id 0 is EOS and padding in both: the NUL byte never occurs in text, and
losses use explicit masks, so padding never needs an id of its own.

`load_tokenizer(dir)` also reads a Hugging Face checkpoint's tokenizer (`tokenizer.json` and the
Hugging Face `tokenizer_config.json`, see `data.hf_tokenizer.HFTokenizer`), which adds BOS and
several stop ids. So every tokenizer also has `bos_id` (None here), `eos_ids` (every id that ends
generation: `(eos_id,)` here), `add_bos` and `chat_template` (None: ours have no Jinja template),
and `encode(text, add_special_tokens=False)` for a continuation (no BOS; the same ids here);
`encode_continuation(tokenizer, text)` is that for any tokenizer, a user's plain one included.

Files written by `save(dir)`:

    tokenizer_config.json    {"type": "byte" | "bpe", "vocab_size": ..., "eos_id": 0, "pad_id": 0}
    tokenizer.json           (BPE only) the Hugging Face tokenizer
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import ConfigError, DataError
from ..files import atomic_write_bytes

__all__ = ["ByteTokenizer", "BPETokenizer", "load_tokenizer", "load_tokenizer_or_bytes", "has_tokenizer",
           "encode_continuation", "train_bpe", "CONFIG_NAME", "EOS_TOKEN"]

CONFIG_NAME = "tokenizer_config.json"
BPE_NAME = "tokenizer.json"
EOS_TOKEN = "<|eos|>"


class ByteTokenizer:
    """Lossless for any text: token id = UTF-8 byte value; vocab 256."""

    vocab_size = 256
    eos_id = 0
    pad_id = 0
    kind = "byte"
    bos_id = None
    add_bos = False
    chat_template = None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: EOS alone."""
        return (self.eos_id,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < 256:
                raise DataError(f"token id {i} is outside the byte vocabulary [0, 256)")
            out.append(i)
        return out.decode("utf-8", errors="replace")

    def save(self, directory) -> Path:
        directory = Path(directory)
        meta = {"type": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id}
        atomic_write_bytes(directory / CONFIG_NAME, json.dumps(meta, indent=2).encode())
        return directory

    def __eq__(self, other):
        return isinstance(other, ByteTokenizer)

    def __repr__(self):
        return "ByteTokenizer(vocab_size=256)"


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) from the `tokenizers` package; id 0 is the EOS token."""

    kind = "bpe"
    pad_id = 0
    bos_id = None
    add_bos = False
    chat_template = None

    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer
        eos = hf_tokenizer.token_to_id(EOS_TOKEN)
        if eos != 0:
            raise DataError(f"BPE tokenizer must have {EOS_TOKEN!r} at id 0 (got {eos}); train it with "
                            f"`palm-rlhf tokenizer train`")
        self.eos_id = 0
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: EOS alone."""
        return (self.eos_id,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise DataError(f"token id {bad[0]} is outside the BPE vocabulary [0, {self.vocab_size})")
        return self._tok.decode(ids, skip_special_tokens=False)

    def save(self, directory) -> Path:
        directory = Path(directory)
        atomic_write_bytes(directory / BPE_NAME, self._tok.to_str().encode())
        meta = {"type": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id}
        atomic_write_bytes(directory / CONFIG_NAME, json.dumps(meta, indent=2).encode())
        return directory

    def __eq__(self, other):
        return isinstance(other, BPETokenizer) and self._tok.to_str() == other._tok.to_str()

    def __repr__(self):
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ConfigError("BPE needs the `tokenizers` package: pip install 'palm-rlhf[bpe]' "
                          "(or use the default byte tokenizer)") from None
    return tokenizers


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> BPETokenizer:
    """Train byte-level BPE on an iterator of texts. Lossless: all 256 bytes are in the alphabet."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257 + 1:
        raise ConfigError(f"vocab_size={vocab_size!r}: byte-level BPE needs more than 257 tokens "
                          f"(256 bytes + EOS); try 4096")
    tk = _require_tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_nonempty(texts), trainer=trainer)
    return BPETokenizer(tok)


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    seen = False
    for t in texts:
        if t:
            seen = True
            yield t
    if not seen:
        raise DataError("no text to train the BPE tokenizer on; check the input files")


def encode_continuation(tokenizer, text: str) -> list[int]:
    """The ids of `text` that continues a sequence (a response after its prompt, a stop string): no BOS.
    Tokenizers whose `encode` adds nothing (ours, a user's object with a plain `encode(text)`) are
    called as they are; a Hugging Face tokenizer that adds BOS/EOS gets `add_special_tokens=False`."""
    if getattr(tokenizer, "adds_special_tokens", False):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def has_tokenizer(directory) -> bool:
    """Whether `directory` holds a tokenizer `load_tokenizer` reads (ours, or a Hugging Face tokenizer.json)."""
    directory = Path(directory)
    return (directory / CONFIG_NAME).is_file() or (directory / BPE_NAME).is_file()


def load_tokenizer(directory):
    """The tokenizer `save(directory)` wrote, or a Hugging Face checkpoint's (tokenizer.json +
    its tokenizer_config.json). DataError when the directory has none."""
    from .hf_tokenizer import is_hf_tokenizer_config, load_hf_tokenizer

    directory = Path(directory)
    meta_path = directory / CONFIG_NAME
    if not meta_path.is_file():
        if (directory / BPE_NAME).is_file():  # a Hugging Face tokenizer.json alone
            return load_hf_tokenizer(directory)
        raise DataError(f"{directory}: no {CONFIG_NAME}; save a tokenizer there or use the byte tokenizer")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{meta_path}: unreadable tokenizer config ({e}); restore the file (it is JSON) or "
                        f"delete the directory's tokenizer files to use bytes") from e
    if is_hf_tokenizer_config(meta):
        return load_hf_tokenizer(directory)
    kind = meta.get("type") if isinstance(meta, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        tk = _require_tokenizers()
        try:
            return BPETokenizer(tk.Tokenizer.from_file(str(directory / BPE_NAME)))
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own Exception type
            raise DataError(f"{directory / BPE_NAME}: cannot load BPE tokenizer ({e})") from e
    raise DataError(f"{meta_path}: unknown tokenizer type {kind!r} (expected 'byte' or 'bpe')")


def load_tokenizer_or_bytes(directory):
    """The tokenizer saved in a checkpoint directory, or the byte tokenizer when none was saved.

    Only a *missing* tokenizer falls back to bytes: one that is saved but unreadable raises
    DataError, because encoding with the wrong tokenizer would train on garbage silently.
    """
    directory = Path(directory)
    return load_tokenizer(directory) if has_tokenizer(directory) else ByteTokenizer()
