"""Reward-model training: `palm-rlhf reward train --base CHECKPOINT --data FILE.jsonl`.

Pairwise records train with the Bradley-Terry loss, rating records with binned cross-entropy
or MSE. The loop is thin: batches come from `reward_data` (a pure function of the step, so
resume is exact), and checkpoints, the optimizer step, metrics and distributed setup come from
`palm_rlhf.runtime`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist

from ..data.preferences import read_preferences
from ..errors import CheckpointError, ConfigError, DataError, TrainingError
from ..model import PaLM
from ..model.reward import POOLINGS, RewardModel
from ..model.checkpoint import atomic_write_bytes
from .reward_data import batch_indices, encode_records, evaluate, make_batch, record_kind, reward_loss, split_validation

log = logging.getLogger(__name__)

OBJECTIVES = ("auto", "pairwise", "binned", "mse")


@dataclass
class RewardTrainConfig:
    base: str = ""                 # a PaLM.save_pretrained directory
    data: str = ""                 # preference JSONL (palm_rlhf.data.preferences)
    out_dir: str = "runs/reward"
    val_data: str = ""             # held-out JSONL; empty: hold out val_fraction of `data`
    val_fraction: float = 0.1
    objective: str = "auto"        # auto: pairwise for pairwise records, binned for ratings
    num_bins: int = 5              # binned head: ratings are whole numbers in [0, num_bins - 1]
    pooling: str = "response_mean"
    use_lora: bool = True
    lora_r: int = 8
    dropout: float = 0.0
    use_margin: bool = True        # subtract each record's margin inside the Bradley-Terry loss
    max_len: int = 256
    batch_size: int = 16           # pairs (or ratings) per micro-batch per process
    grad_accum: int = 1
    max_steps: int = 300
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    clip_grad_norm: float = 1.0
    eval_every: int = 50
    save_every: int = 100
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"        # fp32 | bf16 | fp16
    progress: bool = True

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective={self.objective!r}: use one of {', '.join(OBJECTIVES)}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling={self.pooling!r}: use one of {', '.join(POOLINGS)}")
        for name in ("batch_size", "grad_accum", "max_steps", "max_len", "lora_r", "eval_every", "save_every",
                     "keep_last", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r}: must be a positive integer")
        if self.num_bins < 2:
            raise ConfigError(f"num_bins={self.num_bins!r}: a binned head needs at least 2 bins")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction!r}: must be in [0, 1)")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr!r}: must be > 0")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.clip_grad_norm < 0:
            raise ConfigError("warmup_steps, weight_decay and clip_grad_norm must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout!r}: must be in [0, 1)")


def load_tokenizer_for(directory):
    """The tokenizer saved next to a checkpoint, else the byte tokenizer."""
    from ..data.tokenizer import ByteTokenizer, load_tokenizer

    try:
        return load_tokenizer(directory)
    except (FileNotFoundError, DataError, ConfigError):
        return ByteTokenizer()




def load_reward_config(path=None, overrides=()) -> RewardTrainConfig:
    """YAML preset + ``key=value`` overrides -> a validated config (ConfigError naming the key)."""
    import yaml

    values = {}
    if path:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"--config {path}: cannot read YAML ({e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"--config {path}: expected a mapping of config fields")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: write it as key=value")
        key, raw = item.split("=", 1)
        values[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    fields = RewardTrainConfig.__dataclass_fields__
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}; valid keys: {', '.join(fields)}")
    for key, value in values.items():  # YAML reads 'path' overrides like 123 as ints: restore declared str
        if fields[key].type == "str" and value is not None and not isinstance(value, str):
            values[key] = str(value)
        elif fields[key].type == "float" and isinstance(value, (str, int)) and not isinstance(value, bool):
            try:
                values[key] = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
            except ValueError:
                raise ConfigError(f"{key}={value!r}: must be a number") from None
    return RewardTrainConfig(**values)


class RewardTrainer:
    """setup() -> train() -> cleanup(). One process, or one per device under torchrun."""

    def __init__(self, config: RewardTrainConfig, tokenizer=None):
        self.config = config
        self.tokenizer = tokenizer
        self.step = 0
        self.rank, self.world_size, self.is_main = 0, 1, True

    # ------------------------------------------------------------------ setup

    def setup(self, resume: bool = True) -> "RewardTrainer":
        c = self.config
        self._init_distributed()
        torch.manual_seed(c.seed)
        if not c.base:
            raise ConfigError("base is not set; pass --base CHECKPOINT (a PaLM.save_pretrained directory)")
        if not c.data:
            raise ConfigError("data is not set; pass --data FILE.jsonl")
        records = read_preferences(c.data)
        kind = record_kind(records, c.data)
        objective = c.objective
        if objective == "auto":
            objective = "pairwise" if kind == "pairwise" else "binned"
        if (objective == "pairwise") != (kind == "pairwise"):
            raise ConfigError(f"objective={c.objective!r} does not fit {c.data}, which holds {kind} records; "
                              f"use objective=pairwise for pairs, binned or mse for ratings")
        self.objective = objective
        if objective == "binned":
            for i, r in enumerate(records):
                if r.rating != int(r.rating) or not 0 <= r.rating < c.num_bins:
                    raise DataError(f"{c.data}: record {i + 1} has rating {r.rating!r}; the binned objective "
                                    f"needs whole ratings in [0, {c.num_bins - 1}] (set num_bins, or objective=mse)")
        if c.val_data:
            val_records = read_preferences(c.val_data)
            if record_kind(val_records, c.val_data) != kind:
                raise DataError(f"{c.val_data} holds different records than {c.data}; use the same kind")
            train_records = records
        else:
            train_records, val_records = split_validation(records, c.val_fraction, c.seed)

        self.tokenizer = self.tokenizer or load_tokenizer_for(c.base)
        self.train_data = encode_records(train_records, self.tokenizer)
        self.val_data = encode_records(val_records, self.tokenizer) if val_records else None

        palm = PaLM.from_pretrained(c.base)
        self.model = RewardModel(palm, dropout=c.dropout, num_binned_output=c.num_bins if objective == "binned" else 0,
                                 use_lora=c.use_lora, lora_r=c.lora_r, pooling=c.pooling).to(self.device)
        del palm
        self._build_optimizer()
        self.run_dir = Path(c.out_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if resume:
            self._resume()
        log.info("reward training: %d %s records (%d held out), objective %s, %s, %d trainable parameters",
                 len(self.train_data), kind, len(val_records), objective, "LoRA" if c.use_lora else "full finetune",
                 sum(p.numel() for p in self.model.finetune_parameters()))
        return self

    def _init_distributed(self) -> None:
        """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, nccl on CUDA."""
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and self.config.device in ("auto", "cuda")
        if self.config.device == "auto":
            self.device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        else:
            self.device = torch.device(self.config.device)
        if self.world_size > 1 and not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.is_main = self.rank == 0

    def _build_optimizer(self) -> None:
        c = self.config
        self.params = [p for p in self.model.finetune_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=c.lr, weight_decay=c.weight_decay)

        def schedule(step: int) -> float:
            # linear warmup, then cosine decay to 10% of lr at max_steps
            if step < c.warmup_steps:
                return (step + 1) / c.warmup_steps
            t = (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    # ------------------------------------------------------------------ loop

    def _batch(self, step: int, micro: int) -> dict:
        c = self.config
        idx = batch_indices(step, micro, c.batch_size, c.grad_accum, len(self.train_data), c.seed,
                            self.rank, self.world_size)
        return {k: v.to(self.device) for k, v in make_batch(self.train_data, idx, c.max_len).items()}

    def _optimizer_step(self) -> float:
        """Accumulate grad_accum micro-batches, average across processes, clip, step."""
        c = self.config
        total = 0.0
        for micro in range(c.grad_accum):
            loss, _ = reward_loss(self.model, self._batch(self.step, micro), use_margin=c.use_margin)
            if not torch.isfinite(loss):
                raise TrainingError(f"step {self.step}: loss is {loss.item()}; lower lr (now {c.lr}) or check the data")
            (loss / c.grad_accum).backward()
            total += loss.item() / c.grad_accum
        if self.world_size > 1:
            for p in self.params:
                if p.grad is not None:
                    torch_dist.all_reduce(p.grad)
                    p.grad /= self.world_size
        if c.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, c.clip_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total

    def train(self) -> dict:
        from tqdm import tqdm

        c = self.config
        self.model.train()
        metrics: dict = {}
        bar = tqdm(total=c.max_steps, initial=self.step, disable=not (c.progress and self.is_main),
                   desc="reward", dynamic_ncols=True)
        while self.step < c.max_steps:
            loss = self._optimizer_step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if self.step % c.log_every == 0:
                self._log({"step": self.step, "train/loss": loss, "lr": self.scheduler.get_last_lr()[0]})
            if self.val_data is not None and (self.step % c.eval_every == 0 or self.step == c.max_steps):
                metrics = self.validate()
            if self.step % c.save_every == 0 or self.step == c.max_steps:
                self.save_checkpoint()
        bar.close()
        if self.val_data is not None and not metrics:
            metrics = self.validate()
        if self.is_main:
            self.model.save_pretrained(self.run_dir / "final")
            self._save_tokenizer(self.run_dir / "final")
        return metrics

    def validate(self) -> dict:
        metrics = evaluate(self.model, self.val_data, self.config.batch_size, self.config.max_len, self.device)
        self._log({"step": self.step, **{f"val/{k}": v for k, v in metrics.items()}})
        log.info("step %d validation: %s", self.step, metrics)
        return metrics

    def _log(self, row: dict) -> None:
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with (self.run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")

    def _save_tokenizer(self, directory: Path) -> None:
        if hasattr(self.tokenizer, "save"):
            self.tokenizer.save(directory)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path | None:
        """out_dir/checkpoints/step_XXXXXXXX (written under a temp name, then renamed) + `latest`."""
        if not self.is_main:
            return None
        final = self.ckpt_dir / f"step_{self.step:08d}"
        tmp = self.ckpt_dir / f".tmp_step_{self.step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "torch_rng": torch.get_rng_state(), "config": asdict(self.config)}
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(tmp / "trainer_state.pt", buf.getvalue())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_bytes(self.ckpt_dir / "latest", final.name.encode())
        for old in sorted(self.ckpt_dir.glob("step_*"))[: -self.config.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _resume(self) -> None:
        latest = self.ckpt_dir / "latest"
        if not latest.exists():
            return
        directory = self.ckpt_dir / latest.read_text().strip()
        loaded = RewardModel.from_pretrained(directory)
        self.model.load_state_dict(loaded.state_dict())
        try:
            state = torch.load(directory / "trainer_state.pt", map_location=self.device, weights_only=True)
        except (OSError, RuntimeError, EOFError) as e:
            raise CheckpointError(f"{directory}: cannot read trainer_state.pt ({e}); delete the directory "
                                  f"or pass --no-resume") from e
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        self.step = int(state["step"])
        log.info("resumed from %s at step %d", directory, self.step)

    def cleanup(self) -> None:
        if self.world_size > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


__all__ = ["RewardTrainConfig", "RewardTrainer", "OBJECTIVES", "load_reward_config", "load_tokenizer_for"]
