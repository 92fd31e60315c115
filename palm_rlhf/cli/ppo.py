"""`palm-rlhf ppo --config configs/rl/ppo.yaml [key=value ...]`: PPO with a critic and a reference KL.

`make_rl_command` is shared by the `grpo` and `dpo` commands: parse, load the config
(YAML + dotted overrides), run the trainer, report where the results are.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields

EXAMPLES = """examples:
  palm-rlhf ppo --config configs/rl/ppo.yaml
  palm-rlhf ppo --config configs/rl/ppo.yaml model=runs/sft/final reward_model=runs/reward/final steps=200
  palm-rlhf ppo --config configs/rl/ppo.yaml reward_fn=my_rewards:vowel_share kl_target=6.0
  torchrun --nproc_per_node 2 -m palm_rlhf ppo --config configs/rl/ppo.yaml

A run resumes from the latest checkpoint in out_dir. The trained actor adapter is written to
OUT/actor.safetensors (palm_rlhf.model.checkpoint.load_adapter); metrics to OUT/metrics.jsonl.
"""


def make_rl_command(sub, name: str, help_text: str, examples: str, config_path: str, trainer_path: str):
    parser = sub.add_parser(name, help=help_text, epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help=f"YAML file or packaged preset name, e.g. configs/rl/{name}.yaml or {name}")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config fields (e.g. steps=10)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (same as progress=false)")

    def run(args) -> int:
        from importlib import import_module

        from ..runtime.config import load_config
        from ..runtime.distributed import cleanup, init_distributed

        module, _, cls = config_path.rpartition(".")
        config_cls = getattr(import_module(module), cls)
        overrides = list(args.overrides)
        if args.no_progress and "progress" in {f.name for f in fields(config_cls)}:
            overrides.append("progress=false")
        config = load_config(config_cls, args.config, overrides)
        module, _, cls = trainer_path.rpartition(".")
        from ..trainers.rl_setup import load_model

        env = init_distributed()
        trainer = getattr(import_module(module), cls)(config, model=load_model(config).to(env.device))
        try:
            trainer.setup()
            history = trainer.train()
        finally:
            trainer.cleanup()
            cleanup()
        if env.is_main and history:
            last = {k: round(v, 4) for k, v in history[-1].items() if isinstance(v, float)}
            print(f"{name}: {trainer.step_done} steps done; last step: {last}")
            print(f"adapter: {config.out_dir}/actor.safetensors  metrics: {config.out_dir}/metrics.jsonl")
        logging.getLogger(__name__).debug("%s finished", name)
        return 0

    parser.set_defaults(func=run)
    return parser


def register(sub) -> None:
    make_rl_command(sub, "ppo", "RL fine-tuning with PPO (critic, GAE, KL to the reference)", EXAMPLES,
                    "palm_rlhf.trainers.ppo.PPOConfig", "palm_rlhf.trainers.ppo.PPOTrainer")
