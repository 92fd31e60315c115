"""A Hugging Face checkpoint's tokenizer, read with the `tokenizers` package (never `transformers`).

    tok = load_tokenizer("path/to/llama")        # data.tokenizer.load_tokenizer dispatches here
    tok.encode("Hello")                          # == AutoTokenizer(...)("Hello")["input_ids"] (BOS included)
    tok.encode(" world", add_special_tokens=False)   # a continuation: no BOS
    tok.eos_ids                                  # every stop id: EOS + generation_config.json's eos_token_id
    tok.chat_template                            # the Jinja chat template, or None

The directory holds `tokenizer.json` and the Hugging Face `tokenizer_config.json` (`bos_token`,
`eos_token`, `pad_token`, `add_bos_token`, `add_eos_token`, `chat_template`, `added_tokens_decoder`,
...), and maybe `special_tokens_map.json`, `chat_template.jinja` (wins over the config's template, as
in transformers) and `generation_config.json`. Our own tokenizer directories use the same file name
`tokenizer_config.json` with {"type": "byte" | "bpe"}; `is_hf_tokenizer_config` tells them apart.

The "add BOS" rule is transformers' (v5, `from_pretrained` with a tokenizer.json): the file's
post-processor decides what `encode(text)` adds (Llama 3's and Llama 2's add BOS; Qwen's add
nothing), and `add_bos_token` / `add_eos_token` in tokenizer_config.json are ignored, so a BOS is
never added twice. `add_bos` reports what the post-processor does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..files import atomic_write_bytes

__all__ = ["HFTokenizer", "is_hf_tokenizer_config", "load_hf_tokenizer", "HF_FILES"]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"
TEMPLATE_FILE = "chat_template.jinja"
GENERATION_FILE = "generation_config.json"
HF_FILES = (TOKENIZER_FILE, CONFIG_FILE, SPECIAL_MAP_FILE, TEMPLATE_FILE, GENERATION_FILE)
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_FIX = "copy the tokenizer files of the checkpoint (tokenizer.json, tokenizer_config.json) into the directory again"


def is_hf_tokenizer_config(meta) -> bool:
    """True for a Hugging Face tokenizer_config.json (ours always has "type": "byte" | "bpe")."""
    return isinstance(meta, dict) and "type" not in meta


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable {what} ({e}); {_FIX}") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: a {what} is a JSON object; {_FIX}")
    return data


def _token_text(value) -> str | None:
    """A special token as the config writes it: a string or a serialized AddedToken {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> list[int]:
    """generation_config.json's eos_token_id: an int, a list of ints, or null."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


class HFTokenizer:
    """The interface of `ByteTokenizer`/`BPETokenizer` plus `bos_id`, `eos_ids`, `add_bos`, `chat_template`."""

    kind = "hf"

    def __init__(self, directory):
        import tokenizers as tk

        self.directory = Path(directory)
        self._files = {name: (self.directory / name).read_bytes() for name in HF_FILES
                       if (self.directory / name).is_file()}
        if TOKENIZER_FILE not in self._files:
            raise DataError(f"{self.directory}: no {TOKENIZER_FILE} beside {CONFIG_FILE}; {_FIX} (a checkpoint with "
                            f"only a sentencepiece tokenizer.model: save it once with transformers' "
                            f"AutoTokenizer.from_pretrained(dir).save_pretrained(dir) to write tokenizer.json)")
        try:
            self._tok = tk.Tokenizer.from_str(self._files[TOKENIZER_FILE].decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own Exception type
            raise DataError(f"{self.directory / TOKENIZER_FILE}: cannot load it with `tokenizers` ({e}); "
                            f"{_FIX}") from e
        config = _read_json(self.directory / CONFIG_FILE, "tokenizer config") if CONFIG_FILE in self._files else {}
        special_map = (_read_json(self.directory / SPECIAL_MAP_FILE, "special tokens map")
                       if SPECIAL_MAP_FILE in self._files else {})
        generation = (_read_json(self.directory / GENERATION_FILE, "generation config")
                      if GENERATION_FILE in self._files else {})

        # named special tokens: tokenizer_config.json wins over special_tokens_map.json
        self.special_tokens: dict[str, str] = {}
        for name in SPECIAL_NAMES:
            text = _token_text(config.get(name, special_map.get(name)))
            if text is not None:
                self.special_tokens[name] = text
        self._add_missing_special_tokens(tk, config)

        # tokenizer.json's post-processor decides what encode() adds: read it off an empty encoding
        added = self._tok.encode("", add_special_tokens=True).ids
        self.add_bos = bool(added) and added[0] == self.token_id("bos_token")
        self.adds_special_tokens = bool(added)  # encode(text) != encode(text, add_special_tokens=False)

        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self.token_id("bos_token")
        generation_eos = _ids(generation.get("eos_token_id"))
        eos = self.token_id("eos_token")
        self.eos_ids = tuple(dict.fromkeys(([eos] if eos is not None else []) + generation_eos))
        if not self.eos_ids:
            raise DataError(f"{self.directory}: no EOS token (set \"eos_token\" in {CONFIG_FILE} or "
                            f"\"eos_token_id\" in {GENERATION_FILE}); generation could never stop")
        bad = [i for i in self.eos_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise DataError(f"{self.directory / GENERATION_FILE}: eos_token_id {bad[0]} is outside the vocabulary "
                            f"[0, {self.vocab_size}); fix eos_token_id there")
        self.eos_id = self.eos_ids[0]
        if self.bos_id is None:
            bos = _ids(generation.get("bos_token_id"))
            self.bos_id = bos[0] if bos else None
        pad = self.token_id("pad_token")
        if pad is None:
            pad = (_ids(generation.get("pad_token_id")) or [self.eos_id])[0]
        self.pad_id = pad  # losses use explicit masks: padding only needs some valid id
        self.chat_template = self._chat_template(config)

    # ------------------------------------------------------------------ loading helpers

    def _add_missing_special_tokens(self, tk, config) -> None:
        """As transformers does: named special tokens and added_tokens_decoder entries the file lacks are added."""
        missing = []
        decoder = config.get("added_tokens_decoder") or {}
        entries = sorted(decoder.items(), key=lambda kv: int(kv[0])) if isinstance(decoder, dict) else []
        for _, entry in entries:
            text = _token_text(entry)
            if text is not None and self._tok.token_to_id(text) is None:
                missing.append(tk.AddedToken(text, special=bool(entry.get("special", True)),
                                             normalized=bool(entry.get("normalized", False)),
                                             lstrip=bool(entry.get("lstrip", False)),
                                             rstrip=bool(entry.get("rstrip", False)),
                                             single_word=bool(entry.get("single_word", False))))
        for text in self.special_tokens.values():
            if self._tok.token_to_id(text) is None and all(t.content != text for t in missing):
                missing.append(tk.AddedToken(text, special=True, normalized=False))
        if missing:
            self._tok.add_special_tokens(missing)

    def _chat_template(self, config) -> str | None:
        if TEMPLATE_FILE in self._files:
            try:
                return self._files[TEMPLATE_FILE].decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{self.directory / TEMPLATE_FILE}: not UTF-8 text ({e}); fix or delete it") from e
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
            if template is None:
                raise DataError(f"{self.directory / CONFIG_FILE}: chat_template lists {sorted(map(str, named))} "
                                f"but no \"default\"; name one of them \"default\"")
        if template is not None and not isinstance(template, str):
            raise DataError(f"{self.directory / CONFIG_FILE}: chat_template must be a Jinja string")
        return template

    # ------------------------------------------------------------------ the tokenizer interface

    def token_id(self, name: str) -> int | None:
        """The id of a named special token ("bos_token", "eos_token", ...), None when it has none."""
        text = self.special_tokens.get(name)
        return None if text is None else self._tok.token_to_id(text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """transformers' `tokenizer(text)["input_ids"]`; add_special_tokens=False for a continuation."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True):
        """(ids, [(start, end) character offsets]) of `encode`."""
        enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        return enc.ids, enc.offsets

    def encode_array(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        return np.asarray(self.encode(text, add_special_tokens), dtype=np.int64)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Ids past the vocabulary (a checkpoint's embedding is often padded beyond it,
        e.g. Qwen's) decode to nothing, as in transformers; a negative id is an error."""
        ids = [int(i) for i in ids]
        if any(i < 0 for i in ids):
            raise DataError(f"token id {min(ids)} is negative; token ids are >= 0")
        return self._tok.decode([i for i in ids if i < self.vocab_size], skip_special_tokens=skip_special_tokens)

    def save(self, directory) -> Path:
        """Write the Hugging Face files back exactly as they were read (so `export` can copy them)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in self._files.items():
            atomic_write_bytes(directory / name, data)
        return directory

    def __eq__(self, other):
        return isinstance(other, HFTokenizer) and self._files == other._files

    def __repr__(self):
        template = "yes" if self.chat_template else "none"
        return (f"HFTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={list(self.eos_ids)}, "
                f"chat template: {template})")


def load_hf_tokenizer(directory) -> HFTokenizer:
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        from ..errors import ConfigError
        raise ConfigError("a Hugging Face tokenizer needs the `tokenizers` package: pip install tokenizers") from None
    return HFTokenizer(directory)
