"""DPO / IPO trainer: `palm-rlhf dpo --config dpo model=RUN data=prefs.jsonl [key=value ...]`.

Trains the actor LoRA scope on pairwise preference records (the JSONL schema of
`palm_rlhf.data.preferences`). The reference is the same model with the actor
scope disabled (fresh scope) or a frozen snapshot of a pretrained adapter
(`palm_rlhf.rl.reference`); `lora.r=0` trains every weight against a frozen copy. Reports
held-out implicit-reward accuracy and margin,
the policy's own preference accuracy (log p(chosen) > log p(rejected)), and its drift every
`eval.every` steps: `kl_ref`, KL(policy || reference) in nats per sequence, measured on completions
the policy samples (temperature 1, no filter) for the first `kl_samples` held-out prompts: the
summed log-ratio of each sampled response (`palm_rlhf.rl.kl.sequence_kl`, the k1 estimator:
unbiased). `kl_budget` / `stop_at_kl_budget` are run control (`palm_rlhf.runtime.budget`). The
optimizer and its schedule are `optim.*` (`runtime.optim`), like every other trainer's.
The policy learns with dropout off (step 1 on a fresh scope has loss ln 2 exactly).

`distributed=fsdp` under torchrun shards the policy by block with FSDP2, and the reference with it
(the same model with the scope off or a frozen sibling scope; with `lora.r=0` the frozen copy is
sharded the same way). Evaluation and the kl_ref completions run with the models unsharded
(`runtime.fsdp.gathered`: the ranks' shares and generation lengths differ).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ..data.chat import ChatTemplate, encode_reply, prompt_ids, template_for
from ..data.preferences import PairwiseRecord, read_preferences
from ..data.tokenizer import encode_continuation
from ..errors import ConfigError, DataError
from ..model.checkpoint import load_adapter
from ..generation import SamplingConfig, generate
from ..generation.scoring import Scorer, pack_sequences
from ..model import PaLM
from ..model.adapters import adapter_on_frozen_base
from ..data.sampling import split_heldout, stream_indices
from ..ops import eval_mode
from ..rl.collect import right_pad
from ..rl.kl import SequenceKL, sequence_kl
from ..rl.losses import PREFERENCE_LOSSES, preference_loss
from ..rl.reference import Reference
from ..runtime import fsdp
from ..runtime.distributed import all_reduce_mean, all_reduce_sum
from ..runtime.budget import Budget, check_budget
from ..runtime.optim import OptimConfig, build_optimizer, build_scheduler
from ..runtime.resolve import resolve_model
from ..runtime.run import MergedAdapter, OnRun, Run, RunSettings
from ..runtime.vocab import (BATCH_ALIASES, EVAL_ALIASES, LORA_ALIASES, OPTIM_ALIASES, EvalConfig, LoraConfig,
                             check_batch_keys, check_distributed, lora_kwargs, micro_batches_per_step,
                             step_positions)
from .rl_base import eos_token, start_policy

log = logging.getLogger(__name__)


@dataclass
class DPOConfig(RunSettings):
    ALIASES: ClassVar[dict] = {**OPTIM_ALIASES, **LORA_ALIASES, **EVAL_ALIASES, **BATCH_ALIASES,
                               "steps": "max_steps", "preferences": "data"}

    out_dir: str = "runs/dpo"
    max_steps: int = 200
    model: str = ""                      # the starting PaLM: a run directory (its final/), a final/ or checkpoint dir
    actor_adapter: str | None = None     # optional adapter (e.g. SFT) loaded into the actor scope first
    data: str = ""                       # pairwise preference JSONL (rating records are skipped)
    tokenizer: str | None = None         # None: the tokenizer saved with `model`
    eos_token: int | None = None         # closes every response; None: the tokenizer's EOS id
    batch_size: int = 64                 # pairs per optimizer step, over all processes
    micro_batch_size: int = 0            # pairs per process per forward (accumulation); 0: batch_size / processes
    beta: float = 1.0                # strength of the KL to the reference (higher: closer; configs/rl/dpo.yaml: why)
    loss_type: str = "sigmoid"           # sigmoid (DPO) | ipo
    label_smoothing: float = 0.0     # conservative DPO: assumed share of flipped labels
    max_len: int = 256                   # prompt + response tokens per sequence (prompt cut from the left)
    precision: str = "fp32"          # fp32 | bf16 (autocast) | fp16 (CUDA)
    distributed: str = "ddp"         # ddp | fsdp (FSDP2 fully_shard by block, the reference too), under torchrun
    kl_samples: int = 32             # held-out prompts the policy completes to measure kl_ref (0: no kl_ref)
    kl_max_new_tokens: int = 64      # length of those completions
    kl_budget: float | None = None   # nats/sequence: warn when kl_ref passes it (null: no budget)
    stop_at_kl_budget: bool = False  # end the run at the first kl_ref over kl_budget; final/ keeps the last within it
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0, warmup=10,
                                                                   betas=(0.9, 0.999)))
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(scope="actor"))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(every=50, fraction=0.1))

    def __post_init__(self):
        super().__post_init__()
        check_batch_keys(self.batch_size, self.micro_batch_size)
        check_distributed(self.distributed)
        if int(self.max_len) < 1:
            raise ConfigError(f"max_len={self.max_len} must be >= 1")
        if self.beta <= 0:
            raise ConfigError(f"beta={self.beta} must be > 0")
        if self.loss_type not in PREFERENCE_LOSSES:
            raise ConfigError(f"loss_type={self.loss_type!r}: use one of {', '.join(PREFERENCE_LOSSES)}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if int(self.kl_samples) < 0 or int(self.kl_max_new_tokens) < 1:
            raise ConfigError(f"kl_samples={self.kl_samples} must be >= 0 and "
                              f"kl_max_new_tokens={self.kl_max_new_tokens} >= 1")
        check_budget(self.kl_budget, self.stop_at_kl_budget, bool(self.kl_samples), " and kl_samples > 0")
        if not self.lora.enabled and self.actor_adapter:
            raise ConfigError("actor_adapter needs a LoRA actor scope (lora.r > 0; the adapter is loaded into it); "
                              "to train every weight, start from a run whose final/ has it merged: model=RUN_DIR")


def encode_pair(record: PairwiseRecord, tokenizer, max_len: int, eos: int | None = None, template=None):
    """(prompt ids, chosen ids + EOS, rejected ids + EOS), responses cut to fit `max_len` with the prompt
    losing tokens from the left first. `eos` defaults to the tokenizer's. A conversational record
    (message-list prompt) is rendered with `template` (`data.chat.encode_reply`; None: the plain default):
    each reply's ids are what the template renders for it, end-of-turn token included."""
    eos = tokenizer.eos_id if eos is None else eos
    out = []
    for reply in (record.chosen, record.rejected):
        if record.is_chat:
            prompt, resp = encode_reply(template or ChatTemplate(), tokenizer, list(record.prompt), reply)
        else:
            prompt = tokenizer.encode(record.prompt)
            resp = encode_continuation(tokenizer, reply) + [eos]
        resp = resp[: max_len - 1]
        keep = max_len - len(resp)
        out.append(((prompt or [eos])[-keep:], resp))
    return out


def prompt_of(record: PairwiseRecord, tokenizer, template=None) -> list[int]:
    """The prompt ids a policy continues for `record` (rendered with the template when conversational)."""
    if record.is_chat:
        return prompt_ids(template or ChatTemplate(), tokenizer, list(record.prompt))
    return tokenizer.encode(record.prompt)


class DPOTrainer(OnRun):
    name = "dpo"
    postfix = ("loss",)

    def __init__(self, config: DPOConfig, *, model=None, tokenizer=None, train_records=None, heldout_records=None):
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.train_records, self.heldout_records = train_records, heldout_records
        self.run = Run(config, self.name)
        self.sharded = False  # FSDP (distributed=fsdp under torchrun), decided in setup

    def setup(self) -> "DPOTrainer":
        c = self.config
        self.run.open()
        self.micro, self.accum = micro_batches_per_step(c.batch_size, c.micro_batch_size, self.env.world_size)
        self._load_records()
        start_policy(self)
        self.eos = eos_token(c, self.tokenizer)
        # conversational records render with the model's chat template (Jinja, chat_template.json, or ours)
        self.template = template_for(self.tokenizer, resolve_model(c.model).model_dir if c.model else None)
        self.scope = (c.lora.scope or "actor") if c.lora.enabled else None  # None: every base weight trains
        if self.scope is not None:
            adapter_on_frozen_base(self.model, self.scope, r=c.lora.r, alpha=c.lora.alpha,
                                   **lora_kwargs(self.model.add_finetune_params, c.lora))
            if c.actor_adapter:
                load_adapter(self.model, c.actor_adapter, scope=self.scope)
        else:
            for p in self.model.palm_parameters():
                p.requires_grad_(True)
        self.reference = Reference(self.model, self.scope)  # scope None: a frozen copy of the start
        self.sharded = self.env.world_size > 1 and c.distributed == "fsdp"
        if self.sharded:  # before the optimizer, which must hold the sharded parameters
            for model in self._models():
                fsdp.shard(model, fsdp.PALM_METHODS)
        self.scorer = Scorer(self.model, self.scope, reference=self.reference)  # temperature 1
        trainable = self.trainable()
        self.optimizer = build_optimizer(trainable if self.scope is not None else
                                         [(n, p) for n, p in self.model.named_parameters()
                                          if not n.startswith("finetune_modules.")], c.optim)
        self.scheduler = build_scheduler(self.optimizer, c.optim, c.max_steps)
        self.run.stepper(self.model, self.optimizer, self.scheduler, grad_accum=self.accum,
                         clip_grad_norm=c.optim.max_grad_norm, precision=c.precision)
        # the last policy measured within kl_budget (a fresh run's start: KL 0), kept for final/
        self.budget = Budget(self.name, "kl_ref", c.kl_budget, c.stop_at_kl_budget, log=log,
                             snapshot=lambda: {k: v.detach().clone() for k, v in self.trainable().state_dict().items()},
                             restore=self.trainable().load_state_dict,
                             advice="lower optim.lr or max_steps, raise beta",
                             untrained_advice=f"evaluate sooner (eval.every={c.eval.every} now), lower optim.lr "
                                              f"({c.optim.lr:g})")
        self.budget.begin()
        self.run.start(self)
        return self

    @property
    def stop_requested(self) -> bool:
        return self.budget.stop_requested

    def _models(self) -> list:
        """The policy, and the reference when it is a model of its own (lora.r=0)."""
        return [self.model] + ([self.reference.model] if self.reference.model is not self.model else [])

    def _load_records(self) -> None:
        c = self.config
        if self.train_records is None:
            if not c.data:
                raise ConfigError("data is not set; pass data=FILE.jsonl of pairwise preference records")
            records = [r for r in read_preferences(c.data) if isinstance(r, PairwiseRecord)]
            if self.heldout_records is None and c.eval.data:
                self.heldout_records = [r for r in read_preferences(c.eval.data) if isinstance(r, PairwiseRecord)]
            elif self.heldout_records is None:
                records, self.heldout_records = split_heldout(records, c.eval.fraction, c.seed)
            self.train_records = records
        if not self.train_records:
            raise DataError(f"{c.data or 'the records passed in'}: no pairwise records to train on")
        self.heldout_records = self.heldout_records or []
        if c.eval.samples:
            self.heldout_records = self.heldout_records[:c.eval.samples]

    # ------------------------------------------------------------------ log-probs of pairs

    def _pack(self, records):
        """The pairs of `records` as model inputs (`PackedSequences`), rows chosen0, rejected0, chosen1, ...;
        encoded once per micro-batch: the reference and the policy score the same rows."""
        rows = [encode_pair(r, self.tokenizer, self.config.max_len, self.eos, self.template) for r in records]
        pairs = [side for row in rows for side in row]  # chosen0, rejected0, chosen1, ...
        device = self.model.token_emb.weight.device
        prompts, prompt_lengths = right_pad([torch.tensor(p, dtype=torch.long) for p, _ in pairs])
        responses, response_lengths = right_pad([torch.tensor(r, dtype=torch.long) for _, r in pairs])
        mask = torch.arange(responses.shape[1])[None, :] < response_lengths[:, None]  # (2b, n_r)
        return pack_sequences(prompts.to(device), prompt_lengths.to(device), responses.to(device), mask.to(device))

    def _sequence_log_probs(self, packed, policy: bool):
        """(chosen, rejected) log-probs (b,) each of `_pack`'s rows: summed over response tokens (DPO) or
        averaged (IPO)."""
        logp = self.scorer.policy(packed)[0] if policy else self.scorer.reference_log_probs(packed)
        total = logp.sum(-1)
        if self.config.loss_type == "ipo":
            total = total / packed.mask.sum(-1).clamp(min=1)
        return total[0::2], total[1::2]

    def _loss(self, records):
        c = self.config
        packed = self._pack(records)
        with torch.no_grad():
            ref_c, ref_r = self._sequence_log_probs(packed, policy=False)
        pol_c, pol_r = self._sequence_log_probs(packed, policy=True)
        out = preference_loss(pol_c, pol_r, ref_c, ref_r, c.beta, c.loss_type, c.label_smoothing)
        return out, (pol_c.detach() > pol_r.detach()).float()

    # ------------------------------------------------------------------ loop

    def _batches(self, step: int) -> list[list]:
        """This process's micro-batches of step `step`: pairs step*B .. (step+1)*B - 1 of the stream."""
        c, env = self.config, self.env
        return [[self.train_records[i] for i in stream_indices(c.seed, len(self.train_records), positions)]
                for positions in step_positions(step, c.batch_size, self.micro, env.rank, env.world_size)]

    def train(self) -> list[dict]:
        return self.run.train(self)

    def train_step(self, step: int) -> dict:
        c = self.config
        self.model.train()
        sums: dict[str, float] = {}

        def loss_fn(records):
            out, _ = self._loss(records)
            for k, v in out.metrics().items():
                sums[k] = sums.get(k, 0.0) + float(v) / self.accum
            return out.loss.mean(), float(len(records))

        result = self.run.optimizer_step(loss_fn, self._batches(step))
        # every micro-batch of every rank holds the same number of pairs: the mean of their means is the batch's
        row = {**all_reduce_mean(sums), "grad_norm": result.grad_norm, "lr": result.lr}
        done = step + 1
        if self.heldout_records and ((c.eval.every and done % c.eval.every == 0) or done == c.max_steps):
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
        row.update(self.budget.measure(step, kl.mean, over=kl.over(c.kl_budget)))
        return row

    def trainable(self) -> torch.nn.Module:
        """What trains: the actor LoRA scope, or the whole model (lora.r=0)."""
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
        prompts = [torch.tensor((prompt_of(r, self.tokenizer, self.template) or [self.eos])[-keep:])
                   for r in records]
        with eval_mode(self.model), fsdp.gathered(*self._models()):  # each rank's generation has its own length
            stop = [self.eos] if c.eos_token is not None else list(getattr(self.tokenizer, "eos_ids", [self.eos]))
            sampling = SamplingConfig(max_new_tokens=c.kl_max_new_tokens, temperature=1.0, eos_token=stop,
                                      seed=seed)
            out = generate(self.model, prompts, sampling, finetune_scope=self.scope)
            device = out.tokens.device
            padded, lengths = right_pad(prompts)
            packed = pack_sequences(padded.to(device), lengths.to(device), out.tokens, out.mask)
            return sequence_kl(self.scorer.policy(packed)[0], self.scorer.reference_log_probs(packed), out.mask)

    @torch.no_grad()
    def evaluate(self, records=None, batch_size: int = 32) -> dict[str, float]:
        """Held-out implicit-reward accuracy/margin and policy preference accuracy (all ranks' rows)."""
        records = self.heldout_records if records is None else records
        sums = torch.zeros(4, dtype=torch.float64)
        with eval_mode(self.model), fsdp.gathered(*self._models()):  # the ranks' shares may differ in size
            mine = records[self.env.rank::self.env.world_size]
            for i in range(0, len(mine), batch_size):
                out, prefers = self._loss(mine[i:i + batch_size])
                margin = out.chosen_rewards - out.rejected_rewards
                sums += torch.tensor([float((margin > 0).sum()), float(margin.sum()), float(prefers.sum()),
                                      float(len(margin))], dtype=torch.float64)
        acc, margin, pref, n = all_reduce_sum(sums).tolist()
        n = max(n, 1.0)
        return {"reward_accuracy": acc / n, "reward_margin": margin / n, "preference_accuracy": pref / n}

    # ------------------------------------------------------------------ what a checkpoint holds

    def state_dict(self) -> dict:
        """Under FSDP the sharded tensors are gathered: the checkpoint loads into any number of processes."""
        for model in self._models():
            fsdp.reshard(model)
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 **self.budget.state_dict()}
        if self.scope is not None:  # every weight trains: the checkpoint's model.safetensors holds them
            state["trainable"] = dict(self.trainable().state_dict())
        if self.sharded:
            state = {**fsdp.full_budget_state(state), "optimizer": fsdp.full_optimizer_state(self.optimizer)}
            if "trainable" in state:
                state["trainable"] = fsdp.full_tensors(state["trainable"])
        return state

    def load_state_dict(self, state: dict, directory: Path) -> None:
        for model in self._models():
            fsdp.reshard(model)
        live = self.trainable().state_dict()
        if self.sharded:
            state = fsdp.budget_state_like(state, live)
        if self.scope is None:
            fsdp.load_full_model_state(self.model, PaLM.from_pretrained(directory).state_dict())
        else:
            self.trainable().load_state_dict(fsdp.shard_like(state["trainable"], live) if self.sharded
                                             else state["trainable"])
        if self.sharded:
            fsdp.load_full_optimizer_state(self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:  # checkpoints written before DPO had a schedule have none
            self.scheduler.load_state_dict(state["scheduler"])
        self.budget.load_state_dict(state)

    def saveable(self, final: bool = False):
        if final:  # at a stop over kl_budget, final/ holds the last policy measured within it
            self.budget.roll_back(self.step)
        model = fsdp.gathered_copy(self.model, self.is_main) if self.sharded else self.model  # None off rank 0
        if model is None:
            return None
        return model if self.scope is None else MergedAdapter(model, self.scope)

    def final_record(self) -> dict:
        return {"scope": self.scope, "actor_adapter": self.config.actor_adapter,
                "loss_type": self.config.loss_type, "policy_step": self.budget.final_step(self.step)}

    def cleanup(self) -> None:
        self.run.close()


__all__ = ["DPOConfig", "DPOTrainer", "encode_pair"]
