"""Where pairs come from: a `PairSource` turns a prompt into two completions, and a
`PairQueue` thread keeps a few of them prepared in the database ahead of the raters.
The completions come from checkpoints loaded here or from a running `palm-rlhf serve`.

The app only sees the `PairSource` interface (one method, `make_pair`), so tests and other
front-ends can plug in a fake or any other sampler. `ModelPairSource` is the real one: it
samples from one model (two samples of the same prompt) or from two (one each, sides shuffled
so raters cannot learn which model is on the left); a model is a `LoadedCheckpoint` or a
`ServedModel` (an OpenAI-compatible completions API).
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

    def sample(self, prompt: str, n: int, sampling, seed: int) -> list[str]:
        """n completions of `prompt` (the stop token, and ids the tokenizer does not know, left out)."""
        import torch

        from ..generation import generate

        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise ConfigError("--prompts: a prompt encodes to no tokens; remove empty prompts")
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            out = generate(self.model, [torch.tensor(ids, dtype=torch.long)] * n, sampling, generator=generator)
        eos, vocab = getattr(self.tokenizer, "eos_ids", (self.tokenizer.eos_id,)), self.tokenizer.vocab_size
        texts = []
        for row in out.sequences():
            if row and row[-1] in eos:
                row = row[:-1]  # the stop token is not part of the text a rater reads
            texts.append(self.tokenizer.decode([i for i in row if i < vocab]))
        return texts


class ServedModel:
    """A model behind `palm-rlhf serve` or another OpenAI-compatible completions API
    (`feedback serve --generator URL`): the app asks it for completions instead of loading a
    model, so one server feeds the raters and every other client. `url` is the API's base URL,
    e.g. http://127.0.0.1:8000/v1; its identity in the records is "<model id>@<url>"."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0):
        url = url.rstrip("/")
        self.url = url if url.endswith("/v1") else url + "/v1"
        self.api_key, self.timeout = api_key, timeout
        models = self._call("GET", "/models").get("data") or []
        if not models:
            raise ConfigError(f"--generator {self.url}: the server lists no model")
        self.model = models[0]["id"]
        self.identity = f"{self.model}@{self.url}"

    def sample(self, prompt: str, n: int, sampling, seed: int) -> list[str]:
        body = {"model": self.model, "prompt": prompt, "n": n, "max_tokens": sampling.max_new_tokens,
                "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k, "seed": seed}
        choices = self._call("POST", "/completions", body)["choices"]
        return [c["text"] for c in sorted(choices, key=lambda c: c["index"])]

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        import json
        import urllib.error
        import urllib.request

        headers = {"content-type": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = e.reason
            hint = "; pass its key with --generator-api-key" if e.code == 401 else ""
            raise ConfigError(f"--generator {self.url}: {e.code} {message}{hint}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ConfigError(f"--generator {self.url}: cannot reach it ({getattr(e, 'reason', e)}); start "
                              f"`palm-rlhf serve MODEL` there first") from None


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
    """Two completions per prompt from one or two models: `LoadedCheckpoint`s and/or `ServedModel`s."""

    def __init__(self, checkpoints: list, sampling, seed: int | None = None):
        if len(checkpoints) not in (1, 2):
            raise ConfigError(f"give one or two models (--checkpoint, --generator), got {len(checkpoints)}")
        self.checkpoints = checkpoints
        self.sampling = sampling
        self._rng = random.Random(seed)
        self._seed = seed

    def _sample(self, ckpt, prompt: str, n: int) -> list[str]:
        return ckpt.sample(prompt, n, self.sampling, self._rng.getrandbits(63))

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
