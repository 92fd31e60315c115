"""Supervised finetuning: `palm-rlhf finetune --config PRESET model=RUN data=sft.jsonl [KEY=VALUE ...]`.

Loss: cross entropy on response tokens (+ the appended EOS) only, averaged over all response
tokens of the optimizer step (micro-batches are weighted by their token counts, so accumulation
and processes do not change the objective). Full finetuning (`lora.r=0`, the default), or a LoRA
scope (`lora.r=8`, named by `lora.scope`, default `sft`) on a frozen base.

OUT/final is a plain PaLM directory (LoRA merged into the weights) with the tokenizer saved with
`model`; with LoRA, OUT/final/adapter.safetensors also holds the scope alone (`load_adapter(base, path)`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..data.chat import template_for
from ..data.sampling import split_heldout, stream_indices
from ..data.sft import encode_sft, read_sft, sample_prompt, sft_batch
from ..errors import ConfigError
from ..model import PaLM
from ..model.adapters import adapter_on_frozen_base
from ..ops import masked_positions, token_cross_entropy
from ..runtime import distributed as rdist, fsdp
from ..runtime.resolve import resolve_model
from ..runtime.run import ADAPTER_NAME, MergedAdapter
from ..runtime.vocab import EvalConfig, LoraConfig, lora_kwargs, step_positions
from .base import LMTrainer, RunConfig
from .rl_setup import load_start

log = logging.getLogger(__name__)

__all__ = ["FinetuneConfig", "LoraConfig", "FinetuneTrainer", "ADAPTER_NAME"]  # both re-exported



@dataclass
class FinetuneConfig(RunConfig):
    ALIASES: ClassVar[dict] = {**RunConfig.ALIASES, "base": "model"}

    out_dir: str = "runs/sft"
    model: str = ""             # the starting point: a run directory (its final/), a final/ or checkpoint directory
    tokenizer: str | None = None  # None: the tokenizer saved with `model`
    data: str = ""              # JSONL of {"prompt", "response"}
    seq_len: int = 256          # prompt + response + EOS longer than seq_len + 1 are truncated
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=0))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(every=100, fraction=0.05))

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ConfigError(f"seq_len={self.seq_len!r}: must be an integer >= 2")
        if self.lora.scope and not self.lora.r:
            raise ConfigError(f"lora.scope={self.lora.scope!r} names an adapter but lora.r=0 trains every weight; "
                              f"set lora.r=8 (the rank) to train the scope, or drop lora.scope")


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
        if c.eval.data:
            train, val = records, read_sft(c.eval.data)
        else:
            train, val = split_heldout(records, c.eval.fraction, c.seed)
        if c.eval.samples:
            val = val[:c.eval.samples]
        self.train_examples = encode_sft(train, self.tokenizer, c.seq_len, self.template)
        self.val_examples = encode_sft(val, self.tokenizer, c.seq_len, self.template) if val else []
        self.val_prompts = [sample_prompt(r, self.tokenizer, self.template) for r in (val[:1] or train[:1])]
        log.info("SFT: %d training and %d validation examples", len(train), len(val))

    def build_model(self) -> PaLM:
        c = self.config
        model, self.start_model = self.start_model, None
        self.scope = (c.lora.scope or "sft") if c.lora.r else None
        if self.scope:
            if self.scope in model.finetune_modules:
                raise ConfigError(f"lora.scope={self.scope!r} already exists in {c.model}; choose another name")
            adapter_on_frozen_base(model, self.scope, r=c.lora.r, alpha=c.lora.alpha,
                                   **lora_kwargs(model.add_finetune_params, c.lora))
        return model

    def micro_batches(self, step: int) -> list:
        """Examples step*B .. (step+1)*B - 1 of the endless stream of per-epoch shuffles, this process's share."""
        c, env = self.config, self.env
        batches = []
        for positions in step_positions(step, c.batch_size, self.micro, env.rank, env.world_size):
            picks = [self.train_examples[i] for i in stream_indices(c.seed, len(self.train_examples), positions)]
            tokens, mask = sft_batch(picks, self.tokenizer.pad_id)
            batches.append((tokens.to(env.device), mask.to(env.device)))
        return batches

    def loss(self, batch):
        tokens, mask = batch
        # logits at the loss positions only (the assistant's tokens): the last block and the vocabulary
        # projection skip the prompt's positions; the same mean over the same tokens
        positions, kept = masked_positions(mask)  # (b, T)
        logits = self.forward_module(tokens[:, :-1], finetune_scope=self.scope, positions=positions)  # (b, T, V)
        return token_cross_entropy(logits, tokens[:, 1:].gather(1, positions), kept), mask.sum()

    def evaluate(self) -> dict:
        if not self.val_examples:
            return {}
        env = self.env
        mine = self.val_examples[env.rank::env.world_size]
        # every rank runs as many forwards (FSDP gathers weights in each): the short ranks score a
        # repeated example with its mask zeroed, which counts for nothing
        real = len(mine)
        mine = mine + self.val_examples[:1] * (-(-len(self.val_examples) // env.world_size) - real)
        totals = torch.zeros(2, dtype=torch.float64, device=env.device)
        for i in range(0, len(mine), self.micro):
            tokens, mask = (t.to(env.device) for t in sft_batch(mine[i:i + self.micro], self.tokenizer.pad_id))
            mask[max(real - i, 0):] = False
            logits = self.eval_forward(tokens[:, :-1], finetune_scope=self.scope)
            n = mask.sum()
            if n:
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
        if final and self.scope:  # the base with the scope merged + adapter.safetensors, under FSDP too
            if fsdp.is_sharded(self.wrapped):
                gathered = super().saveable(final)  # every rank gathers; None off rank 0
                return MergedAdapter(gathered, self.scope) if gathered is not None else None
            return MergedAdapter(self.model, self.scope)
        return super().saveable(final)

    def final_record(self) -> dict:
        return {"scope": self.scope} if self.scope else {}
