"""The one way the server and `palm-rlhf chat` load a model for inference."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.tokenizer import load_tokenizer_or_bytes
from ..errors import CheckpointError, ConfigError
from ..model import PaLM
from ..model.checkpoint import load_adapter
from .template import ChatTemplate

log = logging.getLogger(__name__)

ADAPTER_SCOPE = "serve"


@dataclass
class Loaded:
    model: PaLM
    tokenizer: object
    template: ChatTemplate
    name: str                  # the model id clients see (/v1/models)
    finetune_scope: str | None  # the adapter's LoRA scope, if one was given


def set_threads(threads: int) -> None:
    """torch's CPU threads for serving (0 = torch's default), from a `--threads` flag."""
    if threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0 = torch's default), got {threads}")
    if threads:
        torch.set_num_threads(threads)


def load_for_inference(path, adapter=None) -> Loaded:
    """A save_pretrained directory (+ an optional LoRA adapter file) -> model in eval mode, its
    tokenizer (the byte tokenizer when none was saved) and its chat template (or the default)."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{directory}: no config.json; pass a directory written by save_pretrained "
                          f"(a run's final/)")
    model = PaLM.from_pretrained(directory).eval()
    tokenizer = load_tokenizer_or_bytes(directory)
    if tokenizer.vocab_size > model.num_tokens:
        raise CheckpointError(f"{directory}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                              f"{model.num_tokens}; they do not belong together")
    scope = None
    if adapter is not None:
        scope = load_adapter(model, Path(adapter), scope=ADAPTER_SCOPE)
    return Loaded(model, tokenizer, ChatTemplate.load(directory), directory.resolve().name, scope)
