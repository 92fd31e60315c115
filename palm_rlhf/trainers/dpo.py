"""DPO / IPO trainer: `palm-rlhf dpo --config dpo model=RUN data=prefs.jsonl [key=value ...]`.

Trains the actor LoRA scope on pairwise preference records (the JSONL schema of
`palm_rlhf.data.preferences`). The reference is the same model with the actor
scope disabled (fresh scope) or a frozen snapshot of a pretrained adapter
(`palm_rlhf.rl.reference`). Reports held-out implicit-reward accuracy and margin,
the policy's own preference accuracy (log p(chosen) > log p(rejected)), and its drift:
`kl_ref`, KL(policy || reference) in nats per sequence, measured on completions the policy
samples (temperature 1, no filter) for the first `kl_samples` held-out prompts: the summed
log-ratio of each sampled response (`palm_rlhf.rl.kl.sequence_kl`, the k1 estimator: unbiased).
Past `kl_budget` it warns, and with `stop_at_kl_budget` it ends the run there: the checkpoint
holds the policy that passed the budget, final/ the last one measured within it (the starting
policy if the first evaluation was already over). The learning rate warms up linearly, then
decays (cosine) to `lr * min_lr_ratio` at `max_steps`, like every other trainer
(`runtime.optim.build_scheduler`).
The policy learns with dropout off (step 1 on a fresh scope has loss ln 2 exactly).
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
from ..generation import SamplingConfig, generate
from ..generation.scoring import Scorer, pack_sequences
from ..model import PaLM
from ..model.lora import DEFAULT_LORA_ALPHA
from ..rl.collect import right_pad
from ..rl.kl import SequenceKL, sequence_kl
from ..rl.losses import PREFERENCE_LOSSES, preference_loss
from ..rl.reference import Reference
from ..runtime.distributed import all_reduce_mean, all_reduce_sum
from ..runtime.optim import OptimConfig, build_scheduler
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
    batch_size: int = 64                 # pairs per optimizer step (global; a multiple of the processes)
    lr: float = 1e-3                 # learning rate of the actor scope (configs/rl/dpo.yaml: why)
    weight_decay: float = 0.0        # AdamW weight decay
    beta: float = 1.0                # strength of the KL to the reference (higher: closer; configs/rl/dpo.yaml: why)
    loss_type: str = "sigmoid"           # sigmoid (DPO) | ipo
    label_smoothing: float = 0.0     # conservative DPO: assumed share of flipped labels
    max_len: int = 256                   # prompt + response tokens per sequence (prompt cut from the left)
    use_lora: bool = True            # train a LoRA actor scope (false: every weight; reference = a frozen copy)
    lora_r: int = 8                  # LoRA rank
    lora_alpha: float = DEFAULT_LORA_ALPHA  # LoRA output scale alpha / r: a learning rate transfers across ranks
    actor_scope: str = "actor"       # name of the trained LoRA scope
    max_grad_norm: float | None = 1.0  # gradient clipping; null: off
    precision: str = "fp32"          # fp32 | bf16 (autocast) | fp16 (CUDA)
    eval_every: int = 50             # held-out accuracy and kl_ref every N steps (and at the end)
    warmup_steps: int = 10           # linear warmup, then cosine decay to lr * min_lr_ratio at max_steps
    min_lr_ratio: float = 0.1        # the decay ends at lr * min_lr_ratio
    kl_samples: int = 32             # held-out prompts the policy completes to measure kl_ref (0: no kl_ref)
    kl_max_new_tokens: int = 64      # length of those completions
    kl_budget: float | None = None   # nats/sequence: warn when kl_ref passes it (null: no budget)
    stop_at_kl_budget: bool = False  # end the run (checkpoint + final/) at the first kl_ref over kl_budget

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
        if int(self.warmup_steps) < 0 or int(self.kl_samples) < 0 or int(self.kl_max_new_tokens) < 1:
            raise ConfigError(f"warmup_steps={self.warmup_steps}, kl_samples={self.kl_samples} must be >= 0 and "
                              f"kl_max_new_tokens={self.kl_max_new_tokens} >= 1")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.kl_budget is not None and not self.kl_budget > 0:
            raise ConfigError(f"kl_budget={self.kl_budget} must be > 0 nats per sequence (or null: no budget)")
        if self.stop_at_kl_budget and (self.kl_budget is None or not self.kl_samples):
            raise ConfigError("stop_at_kl_budget=true needs kl_budget=NATS and kl_samples > 0 (kl_ref is what "
                              "is compared with the budget)")
        if not self.use_lora and self.actor_adapter:
            raise ConfigError("actor_adapter needs use_lora=true (the adapter is loaded into the LoRA actor scope); "
                              "to train every weight, start from a run whose final/ has it merged: model=RUN_DIR")


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
        self.scope = c.actor_scope if c.use_lora else None  # None: every base weight trains
        if self.scope is not None:
            if self.scope not in self.model.finetune_modules:
                self.model.add_finetune_params(self.scope, lora_r=c.lora_r, lora_alpha=c.lora_alpha)
            if c.actor_adapter:
                load_adapter(self.model, c.actor_adapter, scope=self.scope)
        for p in self.model.palm_parameters():
            p.requires_grad_(self.scope is None)
        self.reference = Reference(self.model, self.scope)  # scope None: a frozen copy of the start
        self.scorer = Scorer(self.model, self.scope, reference=self.reference)  # temperature 1
        self.params = list(self.model.finetune_parameters(self.scope) if self.scope is not None
                           else self.model.palm_parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=c.lr, weight_decay=c.weight_decay)
        schedule = OptimConfig(lr=c.lr, weight_decay=c.weight_decay, warmup_steps=c.warmup_steps,
                               min_lr_ratio=c.min_lr_ratio)
        self.scheduler = build_scheduler(self.optimizer, schedule, c.max_steps)
        self.run.stepper(self.model, self.optimizer, self.scheduler, clip_grad_norm=c.max_grad_norm or 0.0,
                         precision=c.precision)
        self.stop_requested, self.over_budget_since = False, None
        # the last policy measured within kl_budget (a fresh run's start: KL 0), kept for final/
        self.within_budget = self._snapshot(0, 0.0) if c.stop_at_kl_budget else None
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
        logp = self.scorer.policy(packed)[0] if policy else self.scorer.reference_log_probs(packed)
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
        row = {**all_reduce_mean(captured), "grad_norm": result.grad_norm, "lr": result.lr}
        if self.heldout_records and ((step + 1) % c.eval_every == 0 or step + 1 == c.max_steps):
            row.update({f"heldout_{k}": v for k, v in self.evaluate().items()})
            row.update(self._drift(step + 1))
        return row

    def _drift(self, step: int) -> dict:
        """kl_ref (and the budget) for the metrics row; warns once the budget is passed."""
        c = self.config
        kl = self.measure_kl(seed=c.seed + step)
        if kl is None:
            return {}
        row = {"kl_ref": kl.mean, "kl_ref_stderr": kl.stderr}
        if c.kl_budget is not None:
            row["kl_budget"] = c.kl_budget
            if kl.over(c.kl_budget) and self.over_budget_since is None:
                self.over_budget_since = step
                log.warning("dpo step %d: kl_ref %.2f nats/sequence passed kl_budget=%g%s", step, kl.mean,
                            c.kl_budget, "; stopping here (stop_at_kl_budget=true)" if c.stop_at_kl_budget else
                            "; lower lr or max_steps, raise beta, or set stop_at_kl_budget=true to stop at the budget")
            self.stop_requested = c.stop_at_kl_budget and kl.over(c.kl_budget)
            if c.stop_at_kl_budget and not kl.over(c.kl_budget):
                self.within_budget = self._snapshot(step, kl.mean)
        return row

    def _snapshot(self, step: int, kl_ref: float) -> dict:
        return {"step": step, "kl_ref": kl_ref,
                "trainable": {k: v.detach().clone() for k, v in self.trainable().state_dict().items()}}

    def trainable(self) -> torch.nn.Module:
        """What trains: the actor LoRA scope, or the whole model (use_lora=false)."""
        return self.model if self.scope is None else self.model.finetune_modules[self.scope]

    @torch.no_grad()
    def measure_kl(self, records=None, seed: int = 0) -> SequenceKL | None:
        """KL(policy || reference) on completions the policy samples for the first `kl_samples` held-out
        prompts (every rank samples the same rows with the same seed, so no collective is needed)."""
        c = self.config
        records = (self.heldout_records if records is None else records)[: c.kl_samples]
        if not records:
            return None
        keep = max(1, c.max_len - c.kl_max_new_tokens)  # prompts lose tokens from the left, as in training
        prompts = [torch.tensor((self.tokenizer.encode(r.prompt) or [self.eos])[-keep:]) for r in records]
        was_training = self.model.training
        self.model.eval()
        try:
            sampling = SamplingConfig(max_new_tokens=c.kl_max_new_tokens, temperature=1.0, eos_token=self.eos,
                                      seed=seed)
            out = generate(self.model, prompts, sampling, finetune_scope=self.scope)
            device = out.tokens.device
            padded, lengths = right_pad(prompts)
            packed = pack_sequences(padded.to(device), lengths.to(device), out.tokens, out.mask)
            return sequence_kl(self.scorer.policy(packed)[0], self.scorer.reference_log_probs(packed), out.mask)
        finally:
            self.model.train(was_training)

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
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "within_budget": self.within_budget}
        if self.scope is not None:  # every weight trains: the checkpoint's model.safetensors holds them
            state["trainable"] = dict(self.trainable().state_dict())
        return state

    def load_state_dict(self, state: dict, directory: Path) -> None:
        if self.scope is None:
            self.model.load_state_dict(PaLM.from_pretrained(directory).state_dict())
        else:
            self.trainable().load_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:  # checkpoints written before DPO had a schedule have none
            self.scheduler.load_state_dict(state["scheduler"])
        if self.config.stop_at_kl_budget:  # None from a run without the stop: nothing measured within yet
            self.within_budget = state.get("within_budget")

    def saveable(self, final: bool = False):
        if final and self.stop_requested:
            self._roll_back_to_budget()
        return self.model if self.scope is None else MergedAdapter(self.model, self.scope)

    def _roll_back_to_budget(self) -> None:
        """At a stop over kl_budget, the actor scope goes back to the last policy measured within it."""
        kept, c = self.within_budget, self.config
        if kept is None:
            log.warning("dpo: no policy of this run was measured within kl_budget=%g (resumed past it); final/ "
                        "holds step %d's", c.kl_budget, self.step)
            return
        self.trainable().load_state_dict(kept["trainable"])
        if kept["step"] == 0:  # nothing of the training is kept: say so, with the ways out
            log.warning("dpo: the first evaluation (step %d) was already over kl_budget=%g, so final/ holds the "
                        "starting policy, untrained; evaluate sooner (eval_every=%d now), lower lr (%g), or raise "
                        "kl_budget", self.step, c.kl_budget, c.eval_every, c.lr)
            return
        log.info("dpo: final/ holds step %d's policy (kl_ref %.2f, within kl_budget=%g); step %d's passed the "
                 "budget and is in the checkpoint", kept["step"], kept["kl_ref"], c.kl_budget, self.step)

    def final_record(self) -> dict:
        return {"scope": self.scope, "actor_adapter": self.config.actor_adapter,
                "loss_type": self.config.loss_type, "policy_step": self._final_policy_step()}

    def _final_policy_step(self) -> int:
        """The step whose policy final/ holds: the kept one after a stop over the budget."""
        rolled_back = self.stop_requested and self.within_budget is not None
        return self.within_budget["step"] if rolled_back else self.step

    def cleanup(self) -> None:
        self.run.close()


__all__ = ["DPOConfig", "DPOTrainer", "encode_pair"]
