"""The Python API end to end: pretrain a tiny PaLM on standard-library text, train a reward
model on simulated preferences (a rule that likes vowels), tune the PaLM with PPO against it,
and compare samples before and after.

    python examples/python_api.py            # a few minutes on a laptop CPU
    python examples/python_api.py --quick    # seconds; what CI runs
"""
import argparse
import json
import shutil
from pathlib import Path

import torch

from palm_rlhf.data.corpus import stdlib_files
from palm_rlhf.data.preferences import write_preferences
from palm_rlhf.data.synthetic import rule_preference_pairs, rule_score
from palm_rlhf.data.tokenizer import ByteTokenizer
from palm_rlhf.generation import SamplingConfig, generate
from palm_rlhf.model import PaLM
from palm_rlhf.model.reward import RewardModel
from palm_rlhf.runtime.optim import OptimConfig
from palm_rlhf.trainers.base import ModelConfig
from palm_rlhf.trainers.ppo import PPOConfig, PPOTrainer
from palm_rlhf.trainers.pretrain import DataConfig, PretrainConfig, PretrainTrainer
from palm_rlhf.trainers.reward import RewardTrainConfig, RewardTrainer

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--quick", action="store_true", help="tiny sizes and few steps")
p.add_argument("--out", default="runs/examples/python_api")
args = p.parse_args()
out = Path(args.out)
q = args.quick
torch.manual_seed(0)
tok = ByteTokenizer()  # UTF-8 bytes; id 0 is EOS and padding

# 1. Pretrain on a few standard-library files (offline, no download) with the trainer behind `palm-rlhf pretrain`.
steps = 60 if q else 300
pre = PretrainTrainer(PretrainConfig(
    out_dir=str(out / "pretrain"), data=DataConfig(sources=tuple(map(str, stdlib_files()[:40 if q else 300]))),
    model=ModelConfig(dim=32 if q else 96, depth=1 if q else 3, heads=2 if q else 4, dim_head=16 if q else 24),
    seq_len=64 if q else 128, batch_size=16, max_steps=steps, eval={"every": 0}, save_every=0,
    optim=OptimConfig(lr=3e-3, weight_decay=0.01, warmup=steps // 10), progress=not q))
try:  # Ctrl-C saves a checkpoint and raises RunInterrupted: run the same command to resume
    pre_summary = pre.setup().train()  # writes out/pretrain/final: save_pretrained weights + tokenizer
finally:
    pre.cleanup()
model = PaLM.from_pretrained(out / "pretrain" / "final")
loss = pre_summary.get("val/loss")  # None when a finished run was only reloaded
print(f"pretraining: {steps} steps" + (f", validation loss {loss:.3f} nats/byte" if loss is not None else " (reused)"))

# 2. A reward model on simulated preferences: the rule annotator prefers the response with more vowels.
write_preferences(out / "prefs.jsonl", rule_preference_pairs(300 if q else 1500, seed=0))
rm_trainer = RewardTrainer(RewardTrainConfig(model=str(out / "pretrain" / "final"), data=str(out / "prefs.jsonl"),
                                             out_dir=str(out / "reward"), max_steps=30 if q else 200,
                                             optim={"lr": 3e-3},
                                             eval={"every": 10_000}, progress=not q))
rm_metrics = rm_trainer.setup().train()
rm_trainer.cleanup()
reward_model = RewardModel.from_pretrained(out / "reward" / "final")
print(f"reward model: held-out pairwise accuracy {rm_metrics['accuracy']:.3f}")

# 3. PPO: the actor and critic are LoRA scopes on the same PaLM; the base weights stay frozen.
shutil.rmtree(out / "ppo", ignore_errors=True)  # a fresh PPO run each time (a finished pretraining is reused)
prompts = ["def ", "class ", "import ", "return ", "# ", "if ", "for ", "with ", "print(", "self."]
max_new = 16 if q else 24
ppo = PPOTrainer(PPOConfig(out_dir=str(out / "ppo"), max_steps=3 if q else 40, prompts_per_step=16 if q else 32,
                           batch_size=16, epochs=2, max_new_tokens=max_new, eos_token=tok.eos_id, optim={"lr": 3e-3},
                           critic_lr=3e-3, kl_coef=0.05, sample_every=0),
                 model=model, reward=reward_model, prompts=prompts, tokenizer=tok)
history = ppo.setup().train()
ppo.cleanup()


# 4. Before (base weights) vs after (the PPO actor scope), on the same prompts and seed.
def evaluate(scope):
    ids = [torch.tensor(tok.encode(x)) for x in prompts * 4]
    gen = generate(model, ids, SamplingConfig(max_new_tokens=max_new, eos_token=tok.eos_id, seed=1),
                   finetune_scope=scope)
    completions = [torch.tensor([t for t in row if t != tok.eos_id]) for row in gen.sequences()]
    texts = [tok.decode(c.tolist()) for c in completions]
    return {"reward_model": float(reward_model.score(ids, completions).mean()),
            "vowel_share": sum(map(rule_score, texts)) / len(texts), "samples": texts[:3]}


before, after = evaluate(None), evaluate(ppo.actor_scope)
summary = {"pretrain_val_loss": loss, "reward_model_accuracy": rm_metrics["accuracy"], "before": before, "after": after,
           "kl_to_reference": history[-1]["kl_ref"], "ppo_steps": len(history)}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
for name, r in (("before", before), ("after", after)):
    print(f"{name:>6}: reward {r['reward_model']:+.3f}  vowel share {r['vowel_share']:.3f}  e.g. {r['samples'][0]!r}")
print(f"KL to the reference after PPO: {summary['kl_to_reference']:.3f} nats/sequence; wrote {out}/summary.json")
