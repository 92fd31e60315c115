"""`palm-rlhf finetune`: supervised finetuning (full or LoRA) on prompt/response JSONL."""

from __future__ import annotations

from .dialect import add_training_command, import_object, run_trainer

EXAMPLES = """examples:
  palm-rlhf finetune --config lora model=runs/pretrain data=sft.jsonl out_dir=runs/sft
  palm-rlhf finetune --config full model=runs/pretrain data=sft.jsonl optim.lr=1e-4
  palm-rlhf finetune --config lora model=runs/pretrain data=sft.jsonl eval.data=val.jsonl max_steps=500
  torchrun --nproc_per_node 2 -m palm_rlhf finetune --config lora model=runs/pretrain data=sft.jsonl batch_size=8

Each line of data is {"prompt": "...", "response": "..."}; the loss covers the response and the EOS
appended to it. With lora.r=8 only a LoRA scope (lora.scope, default sft) trains; OUT/final holds the
merged model and
OUT/final/adapter.safetensors the scope alone. model= is a run directory (its final/), a final/ or a
checkpoint step directory; the tokenizer saved with it is used unless tokenizer= says otherwise.
Resumes from OUT/checkpoints/latest (resume=never starts over).
"""


def register(sub) -> None:
    add_training_command(sub, "finetune", help="supervised finetuning (SFT) on prompt/response JSONL, full or LoRA",
                         examples=EXAMPLES, config="palm_rlhf.trainers.finetune.FinetuneConfig", run=run)


def run(args, config) -> int:
    return run_trainer(import_object("palm_rlhf.trainers.finetune.FinetuneTrainer")(config), config.out_dir)
