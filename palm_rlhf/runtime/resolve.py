"""What `model=PATH` (and every command's CHECKPOINT argument) may name, resolved in one place.

    source = resolve_model("runs/ppo")          # a run directory: its final/
    source = resolve_model("runs/ppo/final")    # a final/ (or any save_pretrained) directory
    source = resolve_model("runs/ppo/checkpoints/step_00000200")   # one checkpoint of a run
    tokenizer = load_tokenizer_for(source, override=config.tokenizer)
    check_tokenizer_fits(tokenizer, model.num_tokens, where="model=runs/ppo")

A run directory that has no `final/` yet (a run still training, or interrupted) resolves to its
latest checkpoint, with a log line saying so. The tokenizer follows the model: the one saved next
to its weights is used unless `tokenizer=` overrides it; only a model saved without one falls
back to UTF-8 bytes, with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..data.tokenizer import CONFIG_NAME as TOKENIZER_CONFIG, ByteTokenizer, has_tokenizer, load_tokenizer
from ..errors import ConfigError
from .checkpoint import CheckpointManager

log = logging.getLogger(__name__)

__all__ = ["ModelSource", "resolve_model", "load_tokenizer_for", "check_tokenizer_fits", "adapter_file", "ADAPTER_NAME",
           "load_model"]

MODEL_CONFIG = "config.json"
ADAPTER_NAME = "adapter.safetensors"  # a trained LoRA scope alone, beside (or instead of) merged weights
_STEP_PREFIX = "step_"
_EXPECTED = ("a run directory (its final/ is used), a final/ or save_pretrained directory "
             "(config.json + model.safetensors), a checkpoint step directory (RUN/checkpoints/step_NNNNNNNN), "
             "or a Llama/Mistral/Qwen2/Qwen3 checkpoint directory (config.json + model*.safetensors)")


@dataclass(frozen=True)
class ModelSource:
    model_dir: Path             # a save_pretrained directory (config.json + model.safetensors)
    tokenizer_dir: Path | None  # the directory holding tokenizer_config.json or a Hugging Face tokenizer.json
                                # (normally model_dir); None if none saved
    run_dir: Path | None        # the run directory it came from, if any

    @property
    def name(self) -> str:
        """A short human name: the run's (`ppo`), with the step for a checkpoint (`ppo-step_00000200`)."""
        if self.run_dir is None:
            return self.model_dir.resolve().name
        run = self.run_dir.resolve().name
        return f"{run}-{self.model_dir.name}" if self.model_dir.name.startswith(_STEP_PREFIX) else run


def _is_model_dir(path: Path) -> bool:
    return (path / MODEL_CONFIG).is_file()


def _run_dir_of(model_dir: Path) -> Path | None:
    """RUN for RUN/final and RUN/checkpoints/step_N; None for a directory saved on its own."""
    if model_dir.name == "final":
        return model_dir.parent
    if model_dir.name.startswith(_STEP_PREFIX) and model_dir.parent.name == "checkpoints":
        return model_dir.parent.parent
    return None


def _source(model_dir: Path, run_dir: Path | None) -> ModelSource:
    tokenizer_dir = model_dir if has_tokenizer(model_dir) else None
    return ModelSource(model_dir=model_dir, tokenizer_dir=tokenizer_dir, run_dir=run_dir)


def _what_is_there(path: Path) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir() if not p.name.startswith("."))
    except OSError:
        return "unreadable"
    if not names:
        return "it is empty"
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return f"it holds {shown}"


def resolve_model(path) -> ModelSource:
    """The model a path names; ConfigError saying what was expected and what is there otherwise."""
    if path is None or str(path) == "":
        raise ConfigError(f"no model given; expected {_EXPECTED}")
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"{path}: no such file or directory; expected {_EXPECTED}")
    if path.is_file():
        hint = " (a palm-rlhf-pytorch state dict: run `palm-rlhf convert` on it first)" \
            if path.suffix in (".pt", ".bin", ".safetensors") else ""
        raise ConfigError(f"{path}: a file, not a directory{hint}; expected {_EXPECTED}")
    if _is_model_dir(path):
        return _source(path, _run_dir_of(path))
    if _is_model_dir(path / "final"):
        return _source(path / "final", path)
    run_dir = path.parent if path.name == "checkpoints" else path
    latest = CheckpointManager(run_dir, is_main=False).latest()  # read-only: no start-up cleanup
    if latest is not None and _is_model_dir(latest):
        log.warning("%s has no final/ yet (still training, or stopped early); using its latest checkpoint %s",
                    run_dir, latest.name)
        return _source(latest, run_dir)
    raise ConfigError(f"{path}: no model here ({_what_is_there(path)}); expected {_EXPECTED}")


def load_tokenizer_for(source: ModelSource | None, override: str | None = None):
    """`override` (a directory holding a tokenizer, a run/model directory, or `byte`) if given, else the
    tokenizer saved with the model, else the byte tokenizer with a warning."""
    if override not in (None, ""):
        if str(override).lower() in ("byte", "bytes"):
            return ByteTokenizer()
        path = Path(override).expanduser()
        if path.is_file() and path.name in (TOKENIZER_CONFIG, "tokenizer.json"):
            path = path.parent
        if has_tokenizer(path):
            return load_tokenizer(path)
        if path.is_dir():
            found = resolve_model(path).tokenizer_dir
            if found is not None:
                return load_tokenizer(found)
        raise ConfigError(f"tokenizer={override}: no {TOKENIZER_CONFIG} there; pass a directory written by "
                          f"`palm-rlhf tokenizer train`, a Hugging Face checkpoint directory (tokenizer.json), "
                          f"a model/run directory saved with one, or tokenizer=byte")
    if source is not None and source.tokenizer_dir is not None:
        return load_tokenizer(source.tokenizer_dir)
    where = (f"{source.model_dir} has no {TOKENIZER_CONFIG}" if source is not None
             else "no model and no tokenizer= given")
    log.warning("%s: using the byte tokenizer (UTF-8 bytes); pass tokenizer=DIR if the model was trained "
                "with another", where)
    return ByteTokenizer()


def check_tokenizer_fits(tokenizer, num_tokens: int, where: str) -> None:
    """ConfigError, before any training, when the tokenizer has ids the model cannot embed."""
    vocab = int(tokenizer.vocab_size)
    if vocab > int(num_tokens):
        raise ConfigError(f"{where}: the tokenizer has {vocab} ids but the model embeds only {num_tokens} "
                          f"(num_tokens); use the tokenizer saved with the model (leave tokenizer= unset) or a "
                          f"model with num_tokens >= {vocab}")


def adapter_file(adapter, source: ModelSource, flag: str = "--adapter") -> Path:
    """The adapter file `adapter` names: a file, or the adapter.safetensors of a run / model directory.
    Refuses the adapter already merged into `source`'s weights (LoRA, RL and DPO final/ hold both)."""
    path = Path(adapter)
    if path.is_dir():
        path = resolve_model(path).model_dir / ADAPTER_NAME
        if not path.is_file():
            raise ConfigError(f"{flag}: no {ADAPTER_NAME} in {path.parent}; pass the adapter file or the "
                              f"directory of a LoRA/PPO/GRPO/DPO run")
    merged = source.model_dir / ADAPTER_NAME
    if merged.is_file() and path.is_file() and merged.read_bytes() == path.read_bytes():
        raise ConfigError(f"{flag} {path}: {source.model_dir} already has this adapter merged in; drop {flag} "
                          f"(or give the model it was trained from, e.g. the run's model=)")
    return path


def load_model(path, dtype=None, device="cpu"):
    """Any model directory -> the model, in eval mode: a run directory, a final/ or step directory,
    a reward model's, or a Llama/Mistral/Qwen2/Qwen3 checkpoint directory (`model(tokens)` gives
    logits (b, n, vocab), as a `PaLM` does). `dtype`: "fp32" (default) or "bf16", or a torch dtype.

        model = palm_rlhf.load_model("path/to/SmolLM2-135M", dtype="bf16")
    """
    import json

    from ..model import PaLM
    from ..model.families import parse_dtype

    source = resolve_model(path)
    config = json.loads((source.model_dir / MODEL_CONFIG).read_text())
    if config.get("model_type") == "reward_model":
        from ..model.reward import RewardModel

        model = RewardModel.from_pretrained(source.model_dir, map_location=device)
        dtype = parse_dtype(dtype)
        return (model if dtype is None else model.to(dtype)).eval()
    return PaLM.from_pretrained(source.model_dir, map_location=device, dtype=dtype).eval()
