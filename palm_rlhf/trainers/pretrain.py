"""Pretraining: `palm-rlhf pretrain --config configs/pretrain/X.yaml [dotted.key=value ...]`.

Next-token prediction on random windows of a prepared token file. `data.sources` is either a
directory written by `palm-rlhf prepare` or raw inputs (text files, directories, `stdlib`),
which are prepared into `OUT/data` first (and reused by later runs and resumes).

Batches: step s draws `batch_size` window offsets from a generator seeded with (seed, s)
(`data.sampling.seeded`); micro-batch i of process r takes the offsets at the positions
`runtime.vocab.step_positions` gives it. The global batch of a step is therefore the same for any
split into processes and micro-batches, and the step number is the whole data position (exact
resume without saving a sampler).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..data.sampling import seeded
from ..data.corpus import MANIFEST_NAME, load_tokens, prepare_corpus, read_manifest, resolve_sources
from ..data.tokenizer import ByteTokenizer, load_tokenizer
from ..errors import ConfigError, DataError
from ..model import PaLM
from ..ops import token_cross_entropy
from ..runtime import distributed as rdist
from ..runtime.vocab import EvalConfig, step_positions
from .base import LMTrainer, ModelConfig, RunConfig, bits_per_byte

log = logging.getLogger(__name__)

__all__ = ["PretrainConfig", "DataConfig", "PretrainTrainer", "batch_offsets"]


@dataclass
class DataConfig:
    sources: tuple[str, ...] = ("stdlib",)  # a prepared directory, or files / directories / 'stdlib'
    tokenizer: str = "byte"                 # byte, or a directory holding a saved tokenizer

    def __post_init__(self):
        if not self.sources:
            raise ConfigError("data.sources is empty: give text files, directories, a prepared dir, or stdlib")


@dataclass
class PretrainConfig(RunConfig):
    ALIASES: ClassVar[dict] = {**RunConfig.ALIASES, "data.val_fraction": "eval.fraction"}

    out_dir: str = "runs/pretrain"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    seq_len: int = 256               # tokens per training window
    init_from: str = ""            # start from a save_pretrained directory instead of random weights
    # eval.fraction: the share of raw sources held out when they are prepared; eval.samples: windows
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(every=100, fraction=0.05, samples=128))

    def __post_init__(self):
        super().__post_init__()
        if self.eval.data:
            raise ConfigError(f"eval.data={self.eval.data!r}: pretraining holds out eval.fraction of its sources "
                              f"when it prepares them; a prepared directory in data.sources brings its own split")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ConfigError(f"seq_len={self.seq_len!r}: must be an integer >= 2")


def batch_offsets(seed: int, step: int, batch_size: int, high: int) -> torch.Tensor:
    """The `batch_size` window starts in [0, high) of one optimizer step (all processes together)."""
    return torch.randint(0, high, (batch_size,), generator=seeded(seed, step))


def tokenizer_from(spec: str):
    if spec == "byte":
        return ByteTokenizer()
    if not Path(spec).is_dir():
        raise ConfigError(f"data.tokenizer={spec!r}: use 'byte' or a directory with a saved tokenizer "
                          f"(palm-rlhf tokenizer train ... --out DIR)")
    return load_tokenizer(spec)


class PretrainTrainer(LMTrainer):
    name = "pretrain"
    config: PretrainConfig

    # ------------------------------------------------------------------ data

    def _prepared_dir(self) -> Path:
        """The prepared token directory to read (preparing raw sources into OUT/data on rank 0)."""
        c = self.config.data
        if len(c.sources) == 1 and (Path(c.sources[0]) / MANIFEST_NAME).is_file():
            return Path(c.sources[0])
        target = self.run_dir / "data"
        if self.is_main:
            files = resolve_sources(c.sources)  # raises for missing/unreadable inputs
            tokenizer = tokenizer_from(c.tokenizer)
            want = [[str(p), p.stat().st_size] for p in files]
            reuse = False
            if (target / MANIFEST_NAME).is_file():
                m = read_manifest(target)
                have = [[s["path"], s["bytes"]] for s in m["sources"]]
                reuse = (have == want and m["vocab_size"] == tokenizer.vocab_size
                         and m.get("val_fraction") == self.config.eval.fraction)
            if not reuse:
                log.info("preparing %d file(s) into %s", len(files), target)
                prepare_corpus([str(p) for p in files], target, tokenizer, val_fraction=self.config.eval.fraction)
        rdist.barrier()
        return target

    def build_data(self) -> None:
        c = self.config
        data_dir = self._prepared_dir()
        self.manifest = read_manifest(data_dir)
        self.tokenizer = load_tokenizer(data_dir)
        self.train_tokens = load_tokens(data_dir, "train")
        self.val_tokens = load_tokens(data_dir, "val")
        need = c.seq_len + 1
        if len(self.train_tokens) < need:
            raise DataError(f"{data_dir}: the training split has {len(self.train_tokens)} tokens, shorter than one "
                            f"sequence (seq_len + 1 = {need}); lower seq_len or add text")
        if len(self.val_tokens) < need:
            log.warning("validation split has %d tokens (< seq_len + 1 = %d): no validation loss",
                        len(self.val_tokens), need)
            self.val_tokens = None
        val = self.manifest["splits"]["val"]
        self.val_tokens_per_byte = (val["tokens"], val["bytes"])

    def build_model(self) -> PaLM:
        c = self.config
        vocab = self.tokenizer.vocab_size
        if c.init_from:
            model = PaLM.from_pretrained(c.init_from)
            if model.num_tokens != vocab:
                raise ConfigError(f"init_from={c.init_from!r} has {model.num_tokens} tokens but the tokenizer "
                                  f"has {vocab}; prepare the data with that model's tokenizer")
            return model
        return PaLM(**c.model.kwargs(vocab))

    def _windows(self, tokens, starts) -> torch.Tensor:
        idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(self.config.seq_len + 1)  # (b, n + 1)
        return torch.from_numpy(tokens[idx].astype(np.int64)).to(self.env.device)

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        c, env = self.config, self.env
        offsets = batch_offsets(c.seed, step, c.batch_size, len(self.train_tokens) - c.seq_len)
        return [self._windows(self.train_tokens, offsets[[p - step * c.batch_size for p in positions]].numpy())
                for positions in step_positions(step, c.batch_size, self.micro, env.rank, env.world_size)]

    def loss(self, batch: torch.Tensor):
        inputs, targets = batch[:, :-1], batch[:, 1:]  # (b, n)
        logits = self.forward_module(inputs)  # (b, n, V)
        return token_cross_entropy(logits, targets), targets.numel()

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict:
        """Loss and bits per byte on fixed windows spread over the validation split."""
        if self.val_tokens is None:
            return {}
        c, env = self.config, self.env
        last = len(self.val_tokens) - c.seq_len - 1
        world = env.world_size
        if c.eval.samples:  # eval.samples windows (up to a multiple of the processes) spread over the split
            starts = np.linspace(0, last, -(-c.eval.samples // world) * world).astype(np.int64)
        else:  # all of it, window after window (less the last few that do not split over the processes)
            starts = np.arange(0, last + 1, c.seq_len, dtype=np.int64)
            starts = starts[:max(world, len(starts) - len(starts) % world)]
        mine = starts[env.rank::world]  # as many windows on every rank: FSDP gathers weights in each forward
        totals = torch.zeros(2, dtype=torch.float64, device=env.device)
        for i in range(0, len(mine), self.micro):
            batch = self._windows(self.val_tokens, mine[i:i + self.micro])
            logits = self.eval_forward(batch[:, :-1])
            totals[0] += token_cross_entropy(logits, batch[:, 1:]).double() * batch[:, 1:].numel()
            totals[1] += batch[:, 1:].numel()
        loss_sum, count = rdist.all_reduce_sum(totals).tolist()
        loss = loss_sum / count
        return {"val/loss": loss, "val/bpb": bits_per_byte(loss, *self.val_tokens_per_byte)}

    def sample(self) -> str | None:
        """Greedy-free sample continuing the start of the validation text (a private RNG)."""
        from ..generation import SamplingConfig, generate

        if self.env.world_size > 1 and self.config.distributed == "fsdp":
            return None  # sharded weights: sampling would need every rank; skipped
        source = self.val_tokens if self.val_tokens is not None else self.train_tokens
        prompt = torch.from_numpy(np.asarray(source[:32], dtype=np.int64))
        out = generate(self.model, [prompt], SamplingConfig(max_new_tokens=self.config.sample_tokens,
                                                            temperature=0.8, top_k=40, seed=self.config.seed))
        return self.tokenizer.decode(prompt.tolist()) + self.tokenizer.decode(out.sequences()[0])
