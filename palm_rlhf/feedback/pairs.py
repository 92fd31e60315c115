"""Where pairs come from: a `PairSource` turns a prompt into two completions, and a
`PairQueue` thread keeps a few of them prepared in the database ahead of the raters.

The app only sees the `PairSource` interface (one method, `make_pair`), so tests and other
front-ends can plug in a fake or any other sampler. `ModelPairSource` is the real one: it
samples from one checkpoint (two samples of the same prompt) or from two checkpoints (one
each, sides shuffled so raters cannot learn which model is on the left).
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from ..data.prompts import read_prompts  # noqa: F401 - re-exported: the app's prompt files
from ..errors import CheckpointError, ConfigError
from .store import FeedbackStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairDraft:
    completion_a: str
    completion_b: str
    checkpoint_a: str   # identity of the checkpoint that wrote completion_a
    checkpoint_b: str
    sampling: dict      # the settings the completions were sampled with (stored per judgement)


class PairSource(Protocol):
    def make_pair(self, prompt: str) -> PairDraft: ...


@dataclass
class LoadedCheckpoint:
    identity: str   # "<directory name>@<first 12 hex digits of the weights' sha256>"
    model: object
    tokenizer: object


def checkpoint_identity(directory, name: str | None = None) -> str:
    """Name (default: the directory's) plus content hash: two runs that both save to `ckpt/` stay distinguishable."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for file in ("config.json", "model.safetensors"):
        path = directory / file
        if path.is_file():
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return f"{name or directory.resolve().name}@{digest.hexdigest()[:12]}"


def load_checkpoint(directory, name: str | None = None) -> LoadedCheckpoint:
    """`PaLM.from_pretrained(directory)` and its tokenizer (UTF-8 bytes when none was saved); `name` labels it
    (the CLI passes the run's name, so raters' records say `ppo@...`, not `final@...`)."""
    from ..data.tokenizer import load_tokenizer_or_bytes
    from ..model import PaLM

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: no config.json; pass a directory written by "
                              "save_pretrained (or `palm-rlhf convert`) to --checkpoint")
    model = PaLM.from_pretrained(directory).eval()
    tokenizer = load_tokenizer_or_bytes(directory)  # a saved but unreadable one raises DataError
    vocab, num_tokens = tokenizer.vocab_size, model.config["num_tokens"]
    if vocab > num_tokens:
        raise CheckpointError(f"{directory}: tokenizer has {vocab} tokens but the model only {num_tokens}; "
                              "save the matching tokenizer with the model")
    if vocab < num_tokens:
        log.warning("%s: the model has %d tokens but its tokenizer %d; sampled ids >= %d are left out of "
                    "the text raters see", directory, num_tokens, vocab, vocab)
    return LoadedCheckpoint(identity=checkpoint_identity(directory, name), model=model, tokenizer=tokenizer)


class ModelPairSource:
    """Two completions per prompt from one or two PaLM checkpoints."""

    def __init__(self, checkpoints: list[LoadedCheckpoint], sampling, seed: int | None = None):
        if len(checkpoints) not in (1, 2):
            raise ConfigError(f"--checkpoint: give one or two checkpoints, got {len(checkpoints)}")
        self.checkpoints = checkpoints
        self.sampling = sampling
        self._rng = random.Random(seed)
        self._seed = seed

    def _sample(self, ckpt: LoadedCheckpoint, prompt: str, n: int) -> list[str]:
        import torch

        from ..generation import generate

        ids = ckpt.tokenizer.encode(prompt)
        if not ids:
            raise ConfigError("--prompts: a prompt encodes to no tokens; remove empty prompts")
        prompt_ids = torch.tensor(ids, dtype=torch.long)
        generator = torch.Generator().manual_seed(self._rng.getrandbits(63))
        with torch.no_grad():
            out = generate(ckpt.model, [prompt_ids] * n, self.sampling, generator=generator)
        eos, vocab = ckpt.tokenizer.eos_id, ckpt.tokenizer.vocab_size
        texts = []
        for row in out.sequences():
            if row and row[-1] == eos:
                row = row[:-1]  # the stop token is not part of the text a rater reads
            texts.append(ckpt.tokenizer.decode([i for i in row if i < vocab]))
        return texts

    def make_pair(self, prompt: str) -> PairDraft:
        settings = asdict(self.sampling) if hasattr(self.sampling, "__dataclass_fields__") else dict(self.sampling)
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}
        if len(self.checkpoints) == 1:
            (ckpt,) = self.checkpoints
            a, b = self._sample(ckpt, prompt, 2)
            return PairDraft(a, b, ckpt.identity, ckpt.identity, settings)
        first, second = self.checkpoints
        if self._rng.random() < 0.5:
            first, second = second, first  # the left side must not give the model away
        (a,), (b,) = self._sample(first, prompt, 1), self._sample(second, prompt, 1)
        return PairDraft(a, b, first.identity, second.identity, settings)


class PairQueue:
    """A daemon thread that keeps `size` unissued pairs prepared in the store.

    Prompts are used in order, cycling; the position is the number of items already in the
    database, so a restarted server carries on where it stopped.
    """

    def __init__(self, store: FeedbackStore, source: PairSource, prompts: list[str], *, size: int = 8):
        if not prompts:
            raise ConfigError("--prompts: the prompt file has no prompts")
        if size < 1:
            raise ConfigError(f"--queue-size must be at least 1, got {size}")
        self.store, self.source, self.prompts, self.size = store, source, list(prompts), size
        self.last_error: str | None = None
        self._wake = threading.Event()      # set when a pair was taken: maybe refill
        self._ready = threading.Condition()  # notified when a pair was added
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="feedback-pair-queue", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def taken(self) -> None:
        """Tell the producer a pair was issued (it refills without waiting for its timer)."""
        self._wake.set()

    def wait_ready(self, timeout: float) -> bool:
        """Block until at least one unissued pair exists (True) or `timeout` seconds pass."""
        with self._ready:
            return self._ready.wait_for(lambda: self.store.ready_count() > 0, timeout=timeout)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._wake.clear()  # clear before checking, so a `taken()` in between is not lost
            if self.store.ready_count() >= self.size:
                self._wake.wait(timeout=1.0)
                continue
            prompt = self.prompts[self.store.item_count() % len(self.prompts)]
            try:
                draft = self.source.make_pair(prompt)
            except Exception as e:  # noqa: BLE001 - keep serving; the page shows the error
                failures += 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("could not prepare a pair (attempt %d)", failures)
                self._stop.wait(min(30.0, 0.5 * 2 ** min(failures, 6)))
                continue
            failures, self.last_error = 0, None
            self.store.add_item(prompt, draft.completion_a, draft.completion_b, draft.checkpoint_a,
                                draft.checkpoint_b, draft.sampling)
            with self._ready:
                self._ready.notify_all()
