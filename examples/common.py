"""What the examples share (example code, not part of the library): the command line,
pretraining through the library's trainer, sampling + scoring for before/after numbers, the JSON summary.

The examples import it as a sibling module (`python examples/NAME.py` puts this folder on
sys.path), so none of them repeats these helpers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import torch

from palm_rlhf.generation import SamplingConfig, generate
from palm_rlhf.rl.collect import strip_eos
from palm_rlhf.rl.rewards import as_reward_source
from palm_rlhf.model import PaLM
from palm_rlhf.runtime.optim import OptimConfig
from palm_rlhf.trainers.base import ModelConfig
from palm_rlhf.trainers.pretrain import DataConfig, PretrainConfig, PretrainTrainer

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("example")


def parser(description: str, name: str) -> argparse.ArgumentParser:
    """--quick (tiny sizes, ~10-40 s on 2 CPU cores), --out (run directory), --seed."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (what CI runs)")
    p.add_argument("--out", default=str(REPO / "runs" / "examples" / name), help="where to write the run")
    p.add_argument("--seed", type=int, default=0)
    return p


def start(args) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpx2"):  # one line per HTTP request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def pretrain(out_dir: Path, sources: list, *, model: dict, steps: int, batch_size: int, seq_len: int,
             lr: float = 3e-3, seed: int = 0, progress: bool = True):
    """`PretrainTrainer` (what `palm-rlhf pretrain` runs) on text files -> (PaLM, its summary).

    `model` holds ModelConfig fields (dim, depth, heads, dim_head). The run lives in `out_dir`:
    the prepared tokens in data/, checkpoints, metrics.jsonl and final/ (save_pretrained + tokenizer);
    re-running resumes it, and a finished run is only loaded."""
    config = PretrainConfig(out_dir=str(out_dir), data=DataConfig(sources=tuple(str(s) for s in sources)),
                            model=ModelConfig(**model), seq_len=seq_len, max_steps=steps, batch_size=batch_size,
                            optim=OptimConfig(lr=lr, weight_decay=0.01, warmup=max(1, steps // 10)),
                            eval={"every": 0, "samples": 4 * batch_size}, save_every=0, log_every=max(1, steps // 5),
                            progress=progress, seed=seed)
    trainer = PretrainTrainer(config)
    try:  # Ctrl-C / SIGTERM: the trainer saves a checkpoint and raises RunInterrupted (rerun to resume)
        summary = trainer.setup().train()
    finally:
        trainer.cleanup()
    log.info("pretrained %d steps: train loss %.3f, validation loss %.3f", steps, summary.get("train/loss", math.nan),
             summary.get("val/loss", math.nan))
    return PaLM.from_pretrained(Path(out_dir) / "final").eval(), summary


@torch.no_grad()
def sample_and_score(model, tokenizer, prompts: list[str], reward, *, max_new_tokens: int, eos_token: int | None,
                     scope: str | None = None, seed: int = 0, show: int = 3) -> dict:
    """Sample one completion per prompt (temperature 1, as RL samples) with the LoRA `scope` (None: the
    base model) and score them with `reward` (a RewardModel, or fn(prompts, completions) on strings).
    Returns the mean score and a few decoded samples."""
    model.eval()
    ids = [torch.tensor(tokenizer.encode(p), dtype=torch.long) for p in prompts]
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, eos_token=eos_token)
    out = generate(model, ids, config, finetune_scope=scope, generator=torch.Generator().manual_seed(seed))
    completions = [strip_eos(row[:n], r) for row, n, r in zip(out.tokens, out.lengths.tolist(), out.stop_reasons)]
    scores = as_reward_source(reward, tokenizer)(ids, completions, out.stop_reasons)
    texts = [tokenizer.decode(c.tolist()) for c in completions]
    return {"mean": float(scores.mean()), "samples": [{"prompt": p, "completion": t, "score": round(float(s), 4)}
                                                      for p, t, s in zip(prompts[:show], texts, scores.tolist())]}


def rl_summary(history: list[dict], last: int = 3) -> dict:
    """Mean reward and KL to the reference at the first RL step and over the last `last` steps."""
    tail = history[-last:]
    return {"steps": len(history), "reward_first_step": history[0]["reward_mean"],
            "reward_last_steps": sum(h["reward_mean"] for h in tail) / len(tail),
            "kl_last_steps": sum(h["kl_ref"] for h in tail) / len(tail)}


def write_summary(out: Path, summary: dict) -> Path:
    """out/summary.json; every number must be finite (the CI test checks this too)."""
    def check(x, where):
        if isinstance(x, float) and not math.isfinite(x):
            raise ValueError(f"summary value {where} is not finite: {x}")
        if isinstance(x, dict):
            for k, v in x.items():
                check(v, f"{where}.{k}")
        if isinstance(x, list):
            for i, v in enumerate(x):
                check(v, f"{where}[{i}]")

    check(summary, "summary")
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(f"summary written to {path}")
    return path
