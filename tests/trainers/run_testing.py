"""One tiny run of every trainer, built the way the CLI builds it (config keys, files on disk), so the
runtime's promises can be checked for each: signals, exact resume, the NaN step, setup errors."""

from __future__ import annotations

import importlib
import json

import torch

from palm_rlhf.data.preferences import write_preferences
from palm_rlhf.data.synthetic import rule_preference_pairs
from palm_rlhf.data.tokenizer import ByteTokenizer
from palm_rlhf.model import PaLM
from palm_rlhf.runtime.config import load_config

TRAINERS = ("pretrain", "finetune", "reward", "ppo", "grpo", "rloo", "reinforce-pp", "tpo", "flowrl", "dpo",
            "dpo-full")  # dpo-full: lora.r=0
TINY = dict(num_tokens=256, dim=16, depth=1, heads=2, dim_head=8)
TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}\n" for i in range(200))


def vowels(prompts, completions) -> list[float]:
    """A verifiable reward (reward_fn=run_testing:vowels): the share of vowels in each completion."""
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def write_inputs(tmp_path, dropout: float = 0.0):
    """A tiny base model saved with its (byte) tokenizer, and data files for every trainer."""
    torch.manual_seed(0)
    base = tmp_path / "base"
    PaLM(**TINY, attn_dropout=dropout, ff_dropout=dropout).save_pretrained(base)
    ByteTokenizer().save(base)
    (tmp_path / "corpus.txt").write_text(TEXT)
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}: ", "response": f"answer {i}"}) + "\n"
                                                for i in range(24)))
    write_preferences(tmp_path / "prefs.jsonl", rule_preference_pairs(24, seed=0))
    (tmp_path / "prompts.txt").write_text("".join(f"{w} \n" for w in ["the", "cat", "sat", "on", "a", "mat"]))
    return base


def overrides(kind: str, tmp_path, out: str, max_steps: int = 4) -> list[str]:
    common = [f"out_dir={tmp_path / out}", f"max_steps={max_steps}", "progress=false", "device=cpu",
              "report_to=[jsonl]", "log_every=1"]
    base = f"model={tmp_path / 'base'}"
    if kind == "pretrain":
        return common + [f"data.sources=[{tmp_path / 'corpus.txt'}]", "eval.fraction=0.1", "model.dim=16",
                         "model.depth=1", "model.heads=2", "model.dim_head=8", "seq_len=16", "batch_size=2",
                         "eval.every=0", "save_every=0", "optim.warmup=1", "threads=1"]
    if kind == "finetune":
        return common + [base, f"data={tmp_path / 'sft.jsonl'}", "seq_len=24", "batch_size=2", "eval.every=0",
                         "save_every=0", "lora.r=8", "optim.warmup=1", "threads=1"]
    if kind == "reward":
        return common + [base, f"data={tmp_path / 'prefs.jsonl'}", "batch_size=2", "eval.fraction=0",
                         "dropout=0.1", "max_len=32", "optim.warmup=1"]
    if kind in ("ppo", "grpo", "rloo", "reinforce-pp", "tpo", "flowrl"):
        extra = ["prompts_per_step=2", "batch_size=2"] if kind == "ppo" else \
            ["prompts_per_step=2", "group_size=2", "batch_size=4"]
        if kind == "reinforce-pp":
            extra.append("baseline=true")
        return common + [base, f"prompts={tmp_path / 'prompts.txt'}", "reward_fn=run_testing:vowels",
                         "max_new_tokens=4", "sample_every=0", "optim.lr=1e-2", *extra]
    if kind in ("dpo", "dpo-full"):
        return common + [base, f"data={tmp_path / 'prefs.jsonl'}", "batch_size=2", "max_len=32", "eval.every=2",
                         "optim.lr=1e-2", *(["lora.r=0"] if kind == "dpo-full" else [])]
    raise ValueError(kind)


# kind -> (module of palm_rlhf.trainers, its config class, its trainer class)
CLASSES = {"pretrain": ("pretrain", "PretrainConfig", "PretrainTrainer"),
           "finetune": ("finetune", "FinetuneConfig", "FinetuneTrainer"),
           "reward": ("reward", "RewardTrainConfig", "RewardTrainer"), "ppo": ("ppo", "PPOConfig", "PPOTrainer"),
           "grpo": ("grpo", "GRPOConfig", "GRPOTrainer"), "rloo": ("rloo", "RLOOConfig", "RLOOTrainer"),
           "flowrl": ("flowrl", "FlowRLConfig", "FlowRLTrainer"), "tpo": ("tpo", "TPOConfig", "TPOTrainer"),
           "reinforce-pp": ("reinforce_pp", "ReinforcePPConfig", "ReinforcePPTrainer"),
           "dpo": ("dpo", "DPOConfig", "DPOTrainer")}


def config_and_trainer_classes(kind: str):
    module, config, trainer = CLASSES.get(kind, CLASSES["dpo"])  # dpo-full is DPO's
    module = importlib.import_module(f"palm_rlhf.trainers.{module}")
    return getattr(module, config), getattr(module, trainer)


def make_trainer(kind: str, tmp_path, out: str, *extra: str, max_steps: int = 4):
    config_cls, trainer_cls = config_and_trainer_classes(kind)
    return trainer_cls(load_config(config_cls, None, overrides(kind, tmp_path, out, max_steps) + list(extra)))
