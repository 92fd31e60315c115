"""`palm-rlhf ppo --config ppo [key=value ...]`: PPO with a critic and a reference KL.

`add_rl_command` is shared by the `grpo` and `dpo` commands.
"""

from __future__ import annotations

from .dialect import add_training_command, import_object, run_trainer

EXAMPLES = """examples:
  palm-rlhf ppo --config ppo model=runs/sft prompts=prompts.txt reward_model=runs/rm out_dir=runs/ppo
  palm-rlhf ppo --config ppo model=runs/sft prompts=prompts.txt reward_fn=my_rewards:score max_steps=200
  palm-rlhf ppo --config ppo model=runs/sft prompts=prompts.txt reward_model=runs/rm kl_target=6.0
  torchrun --nproc_per_node 2 -m palm_rlhf ppo --config ppo model=runs/sft prompts=prompts.txt reward_model=runs/rm

reward_fn=module:function imports from the working directory (like `python script.py`); the
function is called as fn(prompts, completions) with lists of strings and returns one score each.
A run resumes from the latest checkpoint in out_dir. OUT/final/ holds the base with the trained
actor merged (generate/feedback serve take OUT), OUT/final/adapter.safetensors the actor alone.
"""


def add_rl_command(sub, name: str, help_text: str, examples: str, config_path: str, trainer_path: str):
    def run(args, config) -> int:
        return run_trainer(import_object(trainer_path)(config), config.out_dir)

    return add_training_command(sub, name, help=help_text, examples=examples, config=config_path, run=run)


def register(sub) -> None:
    add_rl_command(sub, "ppo", "RL fine-tuning with PPO (critic, GAE, KL to the reference)", EXAMPLES,
                   "palm_rlhf.trainers.ppo.PPOConfig", "palm_rlhf.trainers.ppo.PPOTrainer")
