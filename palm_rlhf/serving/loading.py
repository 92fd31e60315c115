"""The one way the server and `palm-rlhf chat` load a model for inference."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import CheckpointError, ConfigError
from ..model import PaLM
from ..model.checkpoint import load_adapter
from ..runtime.resolve import adapter_file, check_tokenizer_fits, load_tokenizer_for, resolve_model
from .template import ChatTemplate, JinjaChatTemplate, template_for

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    model: PaLM | None          # None when loaded with weights=False
    tokenizer: object
    template: ChatTemplate | JinjaChatTemplate
    name: str                   # the model id clients see (/v1/models): the run's name, e.g. "ppo"
    finetune_scope: str | None  # the adapter's LoRA scope, if one was given


def set_threads(threads: int) -> None:
    """torch's CPU threads for serving (0 = torch's default), from a `--threads` flag."""
    if threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0 = torch's default), got {threads}")
    if threads:
        torch.set_num_threads(threads)


def load_for_inference(path, adapter=None, tokenizer: str | None = None, *, weights: bool = True,
                       dtype=None) -> Loaded:
    """A run directory, final/ or checkpoint step directory (see `runtime.resolve.resolve_model`), plus
    an optional LoRA adapter -> the model in eval mode with its weights frozen, its tokenizer (the one
    saved with it unless `tokenizer` overrides it) and its chat template (the tokenizer's Jinja template, else
    `chat_template.json` there, else the default; see `data.chat.template_for`).
    `weights=False`: only the tokenizer, template and name (`model` is None; the engine process
    loads and checks the rest, see `worker.EngineProcess`)."""
    source = resolve_model(path)
    model = PaLM.from_pretrained(source.model_dir, dtype=dtype).eval() if weights else None
    if model is not None:  # nothing trains here; frozen weights share their decode layouts (`base_layout`)
        model.requires_grad_(False)
    tok = load_tokenizer_for(source, tokenizer)
    template = template_for(tok, source.model_dir)
    if model is None:
        return Loaded(None, tok, template, source.name, None)
    check_tokenizer_fits(tok, model.num_tokens, str(path))
    scope = None
    if adapter is not None:
        try:
            scope = load_adapter(model, adapter_file(adapter, source))
        except CheckpointError as e:
            raise ConfigError(f"--adapter: {e}") from e
    return Loaded(model, tok, template, source.name, scope)
