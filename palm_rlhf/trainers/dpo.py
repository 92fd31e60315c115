"""DPO / IPO trainer: `palm-rlhf dpo --config configs/rl/dpo.yaml [key=value ...]`.

Trains the actor LoRA scope on pairwise preference records (the JSONL schema of
`palm_rlhf.data.preferences`). The reference is the same model with the actor
scope disabled (fresh scope) or a frozen snapshot of a pretrained adapter
(`palm_rlhf.rl.reference`). Reports held-out implicit-reward accuracy and margin,
and the policy's own preference accuracy (log p(chosen) > log p(rejected)).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..data.preferences import PairwiseRecord, read_preferences
from ..errors import ConfigError, DataError
from ..model.checkpoint import load_adapter
from ..model.lora import DEFAULT_LORA_ALPHA
from ..rl.losses import PREFERENCE_LOSSES, preference_loss
from ..rl.reference import Reference
from ..rl.rollout import pack_sequences, response_log_probs
from ..runtime.distributed import all_reduce_mean, all_reduce_sum
from ..runtime.run import MergedAdapter, OnRun, Run, RunSettings
from .rl_base import eos_token, seeded, start_policy

log = logging.getLogger(__name__)


@dataclass
class DPOConfig(RunSettings):
    ALIASES: ClassVar[dict[str, str]] = {"steps": "max_steps", "preferences": "data"}

    out_dir: str = "runs/dpo"
    max_steps: int = 200
    model: str = ""                      # the starting PaLM: a run directory (its final/), a final/ or checkpoint dir
    actor_adapter: str | None = None     # optional adapter (e.g. SFT) loaded into the actor scope first
    data: str = ""                       # pairwise preference JSONL (rating records are skipped)
    heldout: str | None = None           # held-out JSONL; default: the last heldout_fraction of `data`
    heldout_fraction: float = 0.1    # share of `data` held out when heldout is empty
    tokenizer: str | None = None         # None: the tokenizer saved with `model`
    eos_token: int | None = None         # closes every response; None: the tokenizer's EOS id
    batch_size: int = 16                 # pairs per optimizer step (global; a multiple of the processes)
    lr: float = 5e-4                 # learning rate of the actor scope
    weight_decay: float = 0.0        # AdamW weight decay
    beta: float = 0.1                # strength of the KL to the reference (higher: closer)
    loss_type: str = "sigmoid"           # sigmoid (DPO) | ipo
    label_smoothing: float = 0.0     # conservative DPO: assumed share of flipped labels
    max_len: int = 256                   # prompt + response tokens per sequence (prompt cut from the left)
    lora_r: int = 8                  # LoRA rank
    lora_alpha: float = DEFAULT_LORA_ALPHA  # LoRA output scale alpha / r: a learning rate transfers across ranks
    actor_scope: str = "actor"       # name of the trained LoRA scope
    max_grad_norm: float | None = 1.0  # gradient clipping; null: off
    precision: str = "fp32"          # fp32 | bf16 (autocast) | fp16 (CUDA)
    eval_every: int = 50             # held-out accuracy every N steps (and at the end)

    def __post_init__(self):
        super().__post_init__()
        for name in ("batch_size", "max_len", "lora_r", "eval_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.beta <= 0:
            raise ConfigError(f"beta={self.beta} must be > 0")
        if self.loss_type not in PREFERENCE_LOSSES:
            raise ConfigError(f"loss_type={self.loss_type!r}: use one of {', '.join(PREFERENCE_LOSSES)}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(f"heldout_fraction={self.heldout_fraction} must be in [0, 1)")


def encode_pair(record: PairwiseRecord, tokenizer, max_len: int, eos: int | None = None):
    """(prompt ids, chosen ids + EOS, rejected ids + EOS), responses cut to fit `max_len` with the prompt
    losing tokens from the left first. `eos` defaults to the tokenizer's."""
    eos = tokenizer.eos_id if eos is None else eos
    prompt = tokenizer.encode(record.prompt) or [eos]
    out = []
    for text in (record.chosen, record.rejected):
        resp = (tokenizer.encode(text) + [eos])[: max_len - 1]
        keep = max_len - len(resp)
        out.append((prompt[-keep:], resp))
    return out


class DPOTrainer(OnRun):
    name = "dpo"
    postfix = ("loss",)

    def __init__(self, config: DPOConfig, *, model=None, tokenizer=None, train_records=None, heldout_records=None):
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.train_records, self.heldout_records = train_records, heldout_records
        self.run = Run(config, self.name)

    def setup(self) -> "DPOTrainer":
        c = self.config
        self.run.open()
        self.run.check_divides("batch_size", c.batch_size)
        self._load_records()
        start_policy(self)
        self.eos = eos_token(c, self.tokenizer)
        if c.actor_scope not in self.model.finetune_modules:
            self.model.add_finetune_params(c.actor_scope, lora_r=c.lora_r, lora_alpha=c.lora_alpha)
        if c.actor_adapter:
            load_adapter(self.model, c.actor_adapter, scope=c.actor_scope)
        for p in self.model.palm_parameters():
            p.requires_grad_(False)
        self.reference = Reference(self.model, c.actor_scope)
        self.params = list(self.model.finetune_parameters(c.actor_scope))
        self.optimizer = torch.optim.AdamW(self.params, lr=c.lr, weight_decay=c.weight_decay)
        self.run.stepper(self.model, self.optimizer, clip_grad_norm=c.max_grad_norm or 0.0, precision=c.precision)
        self.run.start(self)
        return self

    def _load_records(self) -> None:
        c = self.config
        if self.train_records is None:
            if not c.data:
                raise ConfigError("data is not set; pass data=FILE.jsonl of pairwise preference records")
            records = [r for r in read_preferences(c.data) if isinstance(r, PairwiseRecord)]
            if self.heldout_records is None and c.heldout:
                self.heldout_records = [r for r in read_preferences(c.heldout) if isinstance(r, PairwiseRecord)]
            elif self.heldout_records is None:
                n_held = int(len(records) * c.heldout_fraction)
                records, self.heldout_records = records[: len(records) - n_held], records[len(records) - n_held:]
            self.train_records = records
        if not self.train_records:
            raise DataError(f"{c.data or 'the records passed in'}: no pairwise records to train on")
        self.heldout_records = self.heldout_records or []

    # ------------------------------------------------------------------ log-probs of pairs

    def _sequence_log_probs(self, records, policy: bool):
        """(chosen, rejected) log-probs (b,) each: summed over response tokens (DPO) or averaged (IPO)."""
        rows = [encode_pair(r, self.tokenizer, self.config.max_len, self.eos) for r in records]
        pairs = [side for row in rows for side in row]  # chosen0, rejected0, chosen1, ...
        device = self.model.token_emb.weight.device
        n_p = max(len(p) for p, _ in pairs)
        n_r = max(len(r) for _, r in pairs)
        prompts = torch.zeros(len(pairs), n_p, dtype=torch.long)
        responses = torch.zeros(len(pairs), n_r, dtype=torch.long)
        mask = torch.zeros(len(pairs), n_r, dtype=torch.bool)
        for i, (p, r) in enumerate(pairs):
            prompts[i, : len(p)] = torch.tensor(p)
            responses[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        packed = pack_sequences(prompts.to(device), torch.tensor([len(p) for p, _ in pairs], device=device),
                                responses.to(device), mask.to(device))
        if policy:
            logp, _ = response_log_probs(self.model, packed, finetune_scope=self.config.actor_scope)
        else:
            logp = self.reference.log_probs(packed)
        total = logp.sum(-1)
        if self.config.loss_type == "ipo":
            total = total / packed.mask.sum(-1).clamp(min=1)
        return total[0::2], total[1::2]

    def _loss(self, records):
        c = self.config
        with torch.no_grad():
            ref_c, ref_r = self._sequence_log_probs(records, policy=False)
        pol_c, pol_r = self._sequence_log_probs(records, policy=True)
        out = preference_loss(pol_c, pol_r, ref_c, ref_r, c.beta, c.loss_type, c.label_smoothing)
        return out, (pol_c.detach() > pol_r.detach()).float()

    # ------------------------------------------------------------------ loop

    def _batch(self, step: int) -> list:
        c = self.config
        n = len(self.train_records)
        per_epoch = max(n // c.batch_size, 1)
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(n, generator=seeded(c.seed, epoch, 5)).tolist()
        rows = order[k * c.batch_size:(k + 1) * c.batch_size]
        world, rank = self.env.world_size, self.env.rank
        share = max(len(rows) // world, 1)
        rows = rows[rank * share:(rank + 1) * share]
        return [self.train_records[i] for i in rows]

    def train(self) -> list[dict]:
        return self.run.train(self)

    def train_step(self, step: int) -> dict:
        c = self.config
        self.model.train()
        captured = {}

        def loss_fn(records):
            out, _ = self._loss(records)
            captured.update(out.metrics())
            return out.loss.mean(), float(len(records))

        result = self.run.optimizer_step(loss_fn, [self._batch(step)])
        # every rank holds batch_size / world pairs: the mean of the ranks' means is the global batch's
        row = {**all_reduce_mean(captured), "grad_norm": result.grad_norm}
        if self.heldout_records and ((step + 1) % c.eval_every == 0 or step + 1 == c.max_steps):
            row.update({f"heldout_{k}": v for k, v in self.evaluate().items()})
        return row

    @torch.no_grad()
    def evaluate(self, records=None, batch_size: int = 32) -> dict[str, float]:
        """Held-out implicit-reward accuracy/margin and policy preference accuracy (all ranks' rows)."""
        records = self.heldout_records if records is None else records
        was_training = self.model.training
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64)
        try:
            mine = records[self.env.rank::self.env.world_size]
            for i in range(0, len(mine), batch_size):
                out, prefers = self._loss(mine[i:i + batch_size])
                margin = out.chosen_rewards - out.rejected_rewards
                sums += torch.tensor([float((margin > 0).sum()), float(margin.sum()), float(prefers.sum()),
                                      float(len(margin))], dtype=torch.float64)
        finally:
            self.model.train(was_training)
        acc, margin, pref, n = all_reduce_sum(sums).tolist()
        n = max(n, 1.0)
        return {"reward_accuracy": acc / n, "reward_margin": margin / n, "preference_accuracy": pref / n}

    # ------------------------------------------------------------------ what a checkpoint holds

    def state_dict(self) -> dict:
        return {"trainable": dict(self.model.finetune_modules[self.config.actor_scope].state_dict()),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict, directory: Path) -> None:
        self.model.finetune_modules[self.config.actor_scope].load_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])

    def saveable(self, final: bool = False):
        return MergedAdapter(self.model, self.config.actor_scope)

    def final_record(self) -> dict:
        return {"scope": self.config.actor_scope, "actor_adapter": self.config.actor_adapter,
                "loss_type": self.config.loss_type}

    def cleanup(self) -> None:
        self.run.close()


__all__ = ["DPOConfig", "DPOTrainer", "encode_pair"]
