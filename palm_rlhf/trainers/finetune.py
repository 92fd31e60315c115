"""Supervised finetuning: `palm-rlhf finetune --config PRESET model=RUN data=sft.jsonl [KEY=VALUE ...]`.

Loss: cross entropy on response tokens (+ the appended EOS) only, averaged over all response
tokens of the optimizer step (micro-batches are weighted by their token counts, so accumulation
and processes do not change the objective). Full finetuning, or a LoRA scope (`lora.scope=sft`)
on a frozen base.

OUT/final is a plain PaLM directory (LoRA merged into the weights) with the tokenizer saved with
`model`; with LoRA, OUT/final/adapter.safetensors also holds the scope alone (`load_adapter(base, path)`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..data.chat import template_for
from ..data.sft import encode_sft, read_sft, sample_prompt, sft_batch, split_records
from ..errors import ConfigError
from ..model import PaLM
from ..model.lora import DEFAULT_LORA_ALPHA
from ..ops import token_cross_entropy
from ..runtime import distributed as rdist, fsdp
from ..runtime.resolve import resolve_model
from ..runtime.run import ADAPTER_NAME, MergedAdapter
from .base import LMTrainer, RunConfig
from .rl_setup import load_start

log = logging.getLogger(__name__)

__all__ = ["FinetuneConfig", "LoraConfig", "FinetuneTrainer", "ADAPTER_NAME"]  # ADAPTER_NAME: re-exported



@dataclass
class LoraConfig:
    scope: str = ""     # "" = full finetune; a name (e.g. "sft") = train only that LoRA scope
    r: int = 8                       # LoRA rank
    alpha: float = DEFAULT_LORA_ALPHA  # LoRA output scale alpha / r: a learning rate transfers across ranks

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"lora.r={self.r!r}: must be a positive integer")


@dataclass
class FinetuneConfig(RunConfig):
    ALIASES: ClassVar[dict[str, str]] = {"base": "model"}

    out_dir: str = "runs/sft"
    model: str = ""             # the starting point: a run directory (its final/), a final/ or checkpoint directory
    tokenizer: str | None = None  # None: the tokenizer saved with `model`
    data: str = ""              # JSONL of {"prompt", "response"}
    val_data: str = ""          # held-out JSONL; empty: hold out val_fraction of `data`
    val_fraction: float = 0.05       # share of `data` held out when val_data is empty
    seq_len: int = 256          # prompt + response + EOS longer than seq_len + 1 are truncated
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ConfigError(f"seq_len={self.seq_len!r}: must be an integer >= 2")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction!r}: must be in [0, 1)")


def sample_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class FinetuneTrainer(LMTrainer):
    name = "finetune"
    config: FinetuneConfig

    def build_data(self) -> None:
        c = self.config
        if not c.model:
            raise ConfigError("model is not set; pass model=RUN_DIR (e.g. runs/pretrain) or a final/ directory")
        if not c.data:
            raise ConfigError("data is not set; pass data=FILE.jsonl of {\"prompt\", \"response\"} lines")
        self.start_model, self.tokenizer = load_start(c.model, c.tokenizer)
        # chat records render with the model's template: its Jinja one, else its chat_template.json, else ours
        self.template = template_for(self.tokenizer, resolve_model(c.model).model_dir)
        records = read_sft(c.data)
        if c.val_data:
            train, val = records, read_sft(c.val_data)
        else:
            train, val = split_records(records, c.val_fraction, c.seed)
        self.train_examples = encode_sft(train, self.tokenizer, c.seq_len, self.template)
        self.val_examples = encode_sft(val, self.tokenizer, c.seq_len, self.template) if val else []
        self.val_prompts = [sample_prompt(r, self.tokenizer, self.template) for r in (val[:1] or train[:1])]
        log.info("SFT: %d training and %d validation examples", len(train), len(val))

    def build_model(self) -> PaLM:
        c = self.config
        model, self.start_model = self.start_model, None
        self.scope = c.lora.scope or None
        if self.scope:
            if self.scope in model.finetune_modules:
                raise ConfigError(f"lora.scope={self.scope!r} already exists in {c.model}; choose another name")
            model.add_finetune_params(self.scope, c.lora.r, c.lora.alpha)
            for p in model.parameters():
                p.requires_grad_(False)
            for p in model.finetune_parameters(self.scope):
                p.requires_grad_(True)
        return model

    def micro_batches(self, step: int) -> list:
        """Global example indices step*B .. (step+1)*B - 1 of an endless stream of per-epoch shuffles."""
        c, env = self.config, self.env
        n = len(self.train_examples)
        per_micro = env.world_size * c.batch_size
        start = step * c.grad_accum * per_micro
        batches = []
        for i in range(c.grad_accum):
            first = start + i * per_micro + env.rank * c.batch_size
            picks = []
            for k in range(first, first + c.batch_size):
                epoch, pos = divmod(k, n)
                picks.append(self.train_examples[int(self._order(epoch)[pos])])
            tokens, mask = sft_batch(picks, self.tokenizer.pad_id)
            batches.append((tokens.to(env.device), mask.to(env.device)))
        return batches

    def _order(self, epoch: int) -> torch.Tensor:
        cached = getattr(self, "_order_cache", None)
        if cached is None or cached[0] != epoch:
            self._order_cache = cached = (epoch, sample_order(self.config.seed, epoch, len(self.train_examples)))
        return cached[1]

    def loss(self, batch):
        tokens, mask = batch
        logits = self.forward_module(tokens[:, :-1], finetune_scope=self.scope)  # (b, n, V)
        return token_cross_entropy(logits, tokens[:, 1:], mask), mask.sum()

    def evaluate(self) -> dict:
        if not self.val_examples:
            return {}
        c, env = self.config, self.env
        mine = self.val_examples[env.rank::env.world_size]
        totals = torch.zeros(2, dtype=torch.float64, device=env.device)
        for i in range(0, len(mine), c.batch_size):
            tokens, mask = (t.to(env.device) for t in sft_batch(mine[i:i + c.batch_size], self.tokenizer.pad_id))
            logits = self.wrapped(tokens[:, :-1], finetune_scope=self.scope)
            n = mask.sum()
            totals[0] += token_cross_entropy(logits, tokens[:, 1:], mask).double() * n
            totals[1] += n
        loss_sum, count = rdist.all_reduce_sum(totals).tolist()
        return {"val/loss": loss_sum / max(count, 1.0)}

    def sample(self) -> str | None:
        from ..generation import SamplingConfig, generate

        if self.env.world_size > 1 and self.config.distributed == "fsdp":
            return None
        ids, text = self.val_prompts[0]
        prompt = torch.tensor(ids or [self.tokenizer.eos_id])
        eos = self.tokenizer.eos_ids
        out = generate(self.model, [prompt], SamplingConfig(max_new_tokens=self.config.sample_tokens, temperature=0.7,
                                                            eos_token=list(eos), seed=self.config.seed),
                       finetune_scope=self.scope)
        return text + " => " + self.tokenizer.decode([t for t in out.sequences()[0] if t not in eos])

    def saveable(self, final: bool = False):
        if final and self.scope and not fsdp.is_sharded(self.wrapped):
            return MergedAdapter(self.model, self.scope)
        return super().saveable(final)

    def final_record(self) -> dict:
        return {"scope": self.scope} if self.scope else {}
