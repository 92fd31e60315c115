"""palm-rlhf against TRL, side by side on the same Llama checkpoint, data and hyperparameters (issue 32).

    python benchmarks/trl.py --quick          # a few minutes: a smaller model, 4 measured steps, 1 repeat
    python benchmarks/trl.py                  # ~11M-parameter Llama, 12 steps, 3 repeats (long on 2 cores)

The script builds everything itself, in --work (default a temporary directory):
- a byte-level BPE tokenizer trained on its own data (tokenizer.json + tokenizer_config.json with a
  Llama-3-style chat template, generation_config.json), as tests/hf_tokenizers.py does;
- a Llama checkpoint written by transformers with **random weights** (no pretraining: every outcome
  starts from the same untrained model, so outcomes compare the trainers, not a base model's skill);
- the data: chat SFT conversations (two-number sums), preference pairs (a complete answer preferred to
  a sloppy one), and arithmetic prompts for GRPO whose answers a function checks (`benchmark_rewards.py`).

Then, for SFT, reward, DPO and GRPO, it runs TRL's SFTTrainer / RewardTrainer / DPOTrainer /
GRPOTrainer (transformers generation) and our CLI (`finetune`, `reward train`, `dpo`, `grpo` with
`reward_fn=module:function`) on that directory, interleaved (ours, trl, ours, trl, ...), each run in
its own subprocess with `torch.set_num_threads(threads)`. The child reads its peak RSS (VmHWM) from
/proc/self/status when training ends (ru_maxrss would be inherited from this parent): ours after the
CLI command returns (its end-of-run evaluation and final/ included), TRL's after `train()` and, for
reward and DPO, `evaluate()` (before 2026-12-07 03:25 UTC TRL's peak excluded `evaluate()`).

Seconds per optimizer step are timed per step (ours: the `time` column of metrics.jsonl with
log_every=1; TRL: a TrainerCallback around each step); the first step (warm-up) and the last (which
may hold the final evaluation or save) are dropped. Outcomes after the same number of steps:
SFT eval loss (one function for both: mean cross-entropy over the held-out assistant tokens, the
end-of-turn token included, computed with transformers' tokenizer on each trained model's logits);
RM held-out accuracy and DPO held-out (implicit-reward) preference accuracy as each library reports
them on the same held-out pairs; GRPO mean reward of the rollouts over the measured steps.

Same hyperparameters: batch (examples per optimizer step), constant learning rate (no warmup), LoRA
r/alpha on q,k,v,o, max lengths, AdamW betas, gradient clipping 1.0, DPO beta, GRPO group size,
prompts per step, completion length, temperature, clip epsilon and KL coefficient.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# this file is named trl.py: keep its folder off sys.path, so `import trl` finds TRL, not this script
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
TRAINERS = ("sft", "reward", "dpo", "grpo")

sys.path.insert(0, str(ROOT))  # the repository: the tests' tokenizer helpers
from tests.helpers.hf_tokenizers import LLAMA3 as TEMPLATE  # noqa: E402  (Llama-3-style: BOS first, <|eot_id|> ends a turn)

SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|pad|>"]

REWARDS_MODULE = '''"""The verifiable GRPO task: 1 for the right sum as the first number of the reply, 0.1 for a reply
holding some number, else 0. Called by both libraries (TRL passes message lists, we pass strings)."""
import re


def _text(x):
    if isinstance(x, list):  # TRL's conversational prompts / completions
        return " ".join(m["content"] for m in x)
    return x


def score(prompts, completions, **kwargs):
    out = []
    for p, c in zip(prompts, completions):
        a, b = map(int, re.search(r"What is (\\d+) \\+ (\\d+)", _text(p)).groups())
        numbers = re.findall(r"\\d+", _text(c))
        out.append(1.0 if numbers and int(numbers[0]) == a + b else 0.1 if numbers else 0.0)
    return out
'''


def settings(quick: bool) -> dict:
    model = (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2) if quick else
             dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                  num_key_value_heads=2))
    return dict(model=model, vocab=1024, steps=6 if quick else 14, repeats=1 if quick else 3,
                batch=8, lr=1e-3, lora_r=8, lora_alpha=16.0, max_len=128, dpo_beta=0.1,
                grpo_prompts=2, group=4, completion=16 if quick else 24, kl=0.04, temperature=1.0, clip=0.2,
                train=160, heldout=32, trl_defaults=False)


# ------------------------------------------------------------------ data, tokenizer, checkpoint

def make_data(work: Path, s: dict) -> None:
    rng = random.Random(0)
    sums = [(rng.randrange(50), rng.randrange(50)) for _ in range(s["train"] + s["heldout"])]
    sloppy = ["{w}?? idk", "maybe {w} lol", "no idea, {w}?", "{w} or so whatever"]

    def question(a, b):
        return f"What is {a} + {b}?"

    def write(name, rows):
        with open(work / name, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    def split(rows):
        return rows[:s["train"]], rows[s["train"]:]

    conv = [[{"role": "user", "content": question(a, b)}, {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]
            for a, b in sums]
    for part, rows in zip(("train", "val"), split(conv)):
        write(f"sft_{part}.jsonl", [{"messages": m} for m in rows])                             # ours
        write(f"sft_{part}_trl.jsonl", [{"prompt": m[:1], "completion": m[1:]} for m in rows])  # TRL
    pairs = [(question(a, b), f"The answer is {a + b}.",
              rng.choice(sloppy).format(w=a + b + rng.choice([-3, -2, -1, 1, 2, 3]))) for a, b in sums]
    for part, rows in zip(("train", "val"), split(pairs)):
        write(f"rm_{part}.jsonl", [{"prompt": f"Q: {q}\nA: ", "chosen": c, "rejected": r} for q, c, r in rows])
        write(f"dpo_{part}.jsonl", [{"prompt": [{"role": "user", "content": q}],
                                     "chosen": [{"role": "assistant", "content": c}],
                                     "rejected": [{"role": "assistant", "content": r}]} for q, c, r in rows])
    write("grpo_prompts.jsonl", [{"prompt": [{"role": "user", "content": question(a, b) + " Reply with the number."}]}
                                 for a, b in sums[:s["train"]]])
    (work / "benchmark_rewards.py").write_text(REWARDS_MODULE)


def make_checkpoint(work: Path, s: dict) -> Path:
    import tokenizers as tk
    import torch
    import transformers

    ckpt = work / "llama"
    ckpt.mkdir(exist_ok=True)
    texts = []
    for name in ("sft_train.jsonl", "rm_train.jsonl"):
        for line in open(work / name):
            texts.append(line)
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=s["vocab"], special_tokens=SPECIALS, show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = tk.processors.ByteLevel(trim_offsets=False)
    tok.save(str(ckpt / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    (ckpt / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "pad_token": "<|pad|>", "chat_template": TEMPLATE}, indent=2))
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), max_position_embeddings=512,
                                      bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|eot_id|>"],
                                      pad_token_id=ids["<|pad|>"], tie_word_embeddings=False, **s["model"])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(ckpt)
    model.generation_config.save_pretrained(ckpt)
    n = sum(p.numel() for p in model.parameters())
    (work / "params.txt").write_text(str(n))
    return ckpt


# ------------------------------------------------------------------ children

def peak_rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def sft_eval_loss(logits_fn, tokenizer, work: Path) -> float:
    """Mean cross-entropy over held-out assistant tokens (the closing <|eot_id|> included), one function
    for both libraries; `logits_fn(ids)` -> (1, n, vocab)."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for line in open(work / "sft_val.jsonl"):
            messages = json.loads(line)["messages"]
            prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(messages, tokenize=False)
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            x = torch.tensor([ids])
            logits = logits_fn(x)[0, :-1].float()
            targets = x[0, 1:]
            start = len(p_ids) - 1
            total += F.cross_entropy(logits[start:], targets[start:], reduction="sum").item()
            count += len(ids) - len(p_ids)
    return total / count


def our_args(trainer: str, work: Path, run: Path, s: dict) -> list[str]:
    """Our CLI command for `trainer`, in the shared vocabulary (optim.*, lora.*, eval.*, batch_size)."""
    ckpt = work / "llama"
    common = [f"model={ckpt}", f"out_dir={run}", f"max_steps={s['steps']}", "log_every=1", "seed=0",
              "--no-progress", "save_every=0"]
    lora = [f"lora.r={s['lora_r']}", f"lora.alpha={s['lora_alpha']}"]
    optim = [f"optim.lr={s['lr']}", "optim.warmup=0", "optim.schedule=constant", "optim.weight_decay=0.0",
             "optim.betas=[0.9,0.999]", "optim.max_grad_norm=1.0"]
    if trainer == "sft":
        return ["finetune", "--config", "lora", *common, *lora, *optim, f"data={work / 'sft_train.jsonl'}",
                f"eval.data={work / 'sft_val.jsonl'}", f"batch_size={s['batch']}", f"seq_len={s['max_len']}",
                f"eval.every={s['steps']}"]
    if trainer == "reward":
        return ["reward", "train", "--config", "pairwise", *common, *lora, *optim, f"data={work / 'rm_train.jsonl'}",
                "pooling=sequence_classification",  # TRL's head: the last token, token ids only
                f"eval.data={work / 'rm_val.jsonl'}", f"batch_size={s['batch']}", f"max_len={s['max_len']}",
                f"eval.every={s['steps']}"]
    if trainer == "dpo":
        return ["dpo", "--config", "dpo", *common, *lora, *optim, f"data={work / 'dpo_train.jsonl'}",
                f"eval.data={work / 'dpo_val.jsonl'}", f"batch_size={s['batch']}", f"max_len={s['max_len']}",
                f"beta={s['dpo_beta']}", f"eval.every={s['steps']}", "eval.samples=0", "kl_samples=0",
                "stop_at_kl_budget=false"]
    rows = s["grpo_prompts"] * s["group"]
    return ["grpo", "--config", "grpo", *common, *lora, *optim, f"prompts={work / 'grpo_prompts.jsonl'}",
            "reward_fn=benchmark_rewards:score", f"prompts_per_step={s['grpo_prompts']}", f"group_size={s['group']}",
            f"rollout_batch_size={rows}", f"batch_size={rows}", "epochs=1",
            f"max_new_tokens={s['completion']}", f"temperature={s['temperature']}", f"kl_coef={s['kl']}",
            f"clip_eps={s['clip']}", "scale_by_std=true", "aggregation=seq_mean", "sample_every=0"]


def child_ours(trainer: str, work: Path, run: Path, s: dict) -> dict:
    sys.path.insert(0, str(work))  # reward_fn=benchmark_rewards:score
    from palm_rlhf.cli.allocator import tune_malloc
    from palm_rlhf.cli.main import main

    tune_malloc()  # what the palm-rlhf executable does first
    rc = main(our_args(trainer, work, run, s))
    if rc:
        raise SystemExit(f"palm-rlhf {trainer} exited {rc}")
    rss = peak_rss_mib()
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    times = {}
    for r in rows:
        if "time" in r:
            times[r["step"]] = r["time"]
    steps = sorted(times)
    step_s = [times[b] - times[a] for a, b in zip(steps, steps[1:]) if b == a + 1]
    step_s = step_s[:-1]  # drop the last step (final evaluation); the first has no predecessor

    def last(key):
        return next(r[key] for r in reversed(rows) if key in r)

    if trainer == "sft":
        import transformers
        from palm_rlhf import load_model

        model = load_model(run).eval()
        tok = transformers.AutoTokenizer.from_pretrained(work / "llama")
        outcome = sft_eval_loss(lambda x: model(x), tok, work)
    elif trainer == "reward":
        outcome = last("val/accuracy")
    elif trainer == "dpo":
        outcome = last("heldout_reward_accuracy")
    else:
        rewards = [r["reward_mean"] for r in rows if "reward_mean" in r]
        outcome = statistics.mean(rewards[1:-1] or rewards)
    return {"step_s": step_s, "rss_mib": rss, "outcome": outcome}


class StepTimer:
    def __init__(self):
        self.times, self._t = [], None

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer.times.append(time.perf_counter() - timer._t)

        return _CB()


def child_trl(trainer: str, work: Path, run: Path, s: dict) -> dict:
    import datasets
    import transformers
    import trl
    from peft import LoraConfig

    datasets.disable_progress_bars()
    ckpt = str(work / "llama")
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    peft_config = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=0.0, bias="none",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                             task_type="SEQ_CLS" if trainer == "reward" else "CAUSAL_LM")
    common = dict(output_dir=str(run), max_steps=s["steps"], learning_rate=s["lr"], lr_scheduler_type="constant",
                  warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0,
                  logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True,
                  disable_tqdm=True, dataloader_num_workers=0, gradient_accumulation_steps=1,
                  # TRL's defaults are bf16 autocast and gradient checkpointing; ours are fp32 and none:
                  # the same method on both sides (--trl-defaults measures TRL as it comes)
                  bf16=s["trl_defaults"], gradient_checkpointing=s["trl_defaults"])
    timer = StepTimer()

    def load(name):
        return datasets.load_dataset("json", data_files=str(work / name), split="train")

    if trainer == "sft":
        args = trl.SFTConfig(**common, per_device_train_batch_size=s["batch"], max_length=s["max_len"],
                             completion_only_loss=True, packing=False, eval_strategy="no")
        t = trl.SFTTrainer(model=ckpt, args=args, train_dataset=load("sft_train_trl.jsonl"), processing_class=tok,
                           peft_config=peft_config, callbacks=[timer.callback()])
    elif trainer == "reward":
        args = trl.RewardConfig(**common, per_device_train_batch_size=s["batch"], per_device_eval_batch_size=s["batch"],
                                max_length=s["max_len"], eval_strategy="no")
        t = trl.RewardTrainer(model=ckpt, args=args, train_dataset=load("rm_train.jsonl"),
                              eval_dataset=load("rm_val.jsonl"), processing_class=tok, peft_config=peft_config,
                              callbacks=[timer.callback()])
    elif trainer == "dpo":
        args = trl.DPOConfig(**common, per_device_train_batch_size=s["batch"], per_device_eval_batch_size=s["batch"],
                             max_length=s["max_len"], beta=s["dpo_beta"], eval_strategy="no")
        t = trl.DPOTrainer(model=ckpt, args=args, train_dataset=load("dpo_train.jsonl"),
                           eval_dataset=load("dpo_val.jsonl"), processing_class=tok, peft_config=peft_config,
                           callbacks=[timer.callback()])
    else:
        sys.path.insert(0, str(work))
        from benchmark_rewards import score

        rows = s["grpo_prompts"] * s["group"]
        args = trl.GRPOConfig(**common, per_device_train_batch_size=rows, num_generations=s["group"],
                              steps_per_generation=1, num_iterations=1, max_completion_length=s["completion"],
                              temperature=s["temperature"], beta=s["kl"], epsilon=s["clip"], loss_type="grpo",
                              scale_rewards="group", top_k=0, top_p=1.0, use_vllm=False)
        t = trl.GRPOTrainer(model=ckpt, reward_funcs=score, args=args, train_dataset=load("grpo_prompts.jsonl"),
                            processing_class=tok, peft_config=peft_config, callbacks=[timer.callback()])
    t.train()
    step_s = timer.times[1:-1]
    logs = t.state.log_history
    # the peak includes the held-out evaluation, as ours includes its end-of-run evaluation
    if trainer == "reward":
        outcome = t.evaluate()["eval_accuracy"]
    elif trainer == "dpo":
        outcome = t.evaluate()["eval_rewards/accuracies"]
    rss = peak_rss_mib()
    if trainer == "sft":
        model = t.model.eval()
        outcome = sft_eval_loss(lambda x: model(input_ids=x).logits, tok, work)
    elif trainer == "grpo":
        rewards = [r["reward"] for r in logs if "reward" in r]
        outcome = statistics.mean(rewards[1:-1] or rewards)
    return {"step_s": step_s, "rss_mib": rss, "outcome": outcome}


def child(impl: str, trainer: str, work: Path, run: Path, s: dict, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    result = (child_ours if impl == "ours" else child_trl)(trainer, work, run, s)
    result["threads_after"] = torch.get_num_threads()  # a library that reset the thread count shows here
    (run / "result.json").write_text(json.dumps(result))


# ------------------------------------------------------------------ parent

def spawn(impl, trainer, work, run, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(work), os.environ.get("PYTHONPATH", "")])}
    shutil.rmtree(run, ignore_errors=True)  # a finished run directory would be resumed, not trained
    run.mkdir(parents=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl, trainer, "--work", str(work),
           "--run", str(run), "--threads", str(args.threads), "--steps", str(args.steps or 0)]
    cmd += (["--quick"] if args.quick else []) + (["--trl-defaults"] if args.trl_defaults else [])
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-25:]
        raise RuntimeError(f"{impl} {trainer} failed (exit {done.returncode}):\n" + "\n".join(tail))
    result = json.loads((run / "result.json").read_text())
    result["wall_s"] = time.time() - t0
    return result


def fmt_steps(times) -> str:
    return f"{statistics.median(times):.3f} ({min(times):.3f}-{max(times):.3f})"


OUTCOME = {"sft": "eval loss (lower better)", "reward": "RM held-out accuracy", "dpo": "DPO held-out accuracy",
           "grpo": "GRPO mean reward"}
TARGET = {"sft": 1.3, "reward": 1.3, "dpo": 1.3, "grpo": 3.0}


def table(results: dict) -> str:
    lines = ["| trainer | ours s/step, median (range) | TRL s/step, median (range) | speed-up (target) | "
             "ours peak RSS MiB | TRL peak RSS MiB | outcome | ours | TRL |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for trainer in TRAINERS:
        if not all(results.get((impl, trainer)) for impl in ("ours", "trl")):
            continue
        row = {}
        for impl in ("ours", "trl"):
            runs = results[(impl, trainer)]
            times = [t for r in runs for t in r["step_s"]]
            row[impl] = dict(times=times, med=statistics.median(times), rss=max(r["rss_mib"] for r in runs),
                             out=statistics.mean(r["outcome"] for r in runs),
                             outs=[r["outcome"] for r in runs])
        speed = row["trl"]["med"] / row["ours"]["med"]
        met = "met" if speed >= TARGET[trainer] else "not met"
        mem = "" if row["ours"]["rss"] <= row["trl"]["rss"] else " (more)"
        outs = {impl: " / ".join(f"{o:.3f}" for o in row[impl]["outs"]) for impl in row}
        lines.append(f"| {trainer} | {fmt_steps(row['ours']['times'])} | {fmt_steps(row['trl']['times'])} | "
                     f"{speed:.2f}x ({TARGET[trainer]}x: {met}) | {row['ours']['rss']:.0f}{mem} | "
                     f"{row['trl']['rss']:.0f} | {OUTCOME[trainer]} | {outs['ours']} | {outs['trl']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller model, fewer steps, one repeat")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trl-defaults", action="store_true",
                   help="TRL with its own defaults (bf16 autocast, gradient checkpointing) instead of fp32")
    p.add_argument("--trainers", default=",".join(TRAINERS))
    p.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON (benchmarks/report.py reads it)")
    p.add_argument("--child", nargs=2, metavar=("IMPL", "TRAINER"), help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    args = p.parse_args()
    s = settings(args.quick)
    if args.steps:
        s["steps"] = args.steps
    s["trl_defaults"] = args.trl_defaults
    if args.child:
        child(args.child[0], args.child[1], Path(args.work), Path(args.run), s, args.threads)
        return
    repeats = args.repeats or s["repeats"]
    work = Path(args.work or tempfile.mkdtemp(prefix="trl-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    make_data(work, s)
    make_checkpoint(work, s)
    import importlib.metadata as md

    import torch
    import transformers

    print(f"work dir {work}; Llama with random weights, {int((work / 'params.txt').read_text()) / 1e6:.1f}M "
          f"parameters; torch {torch.__version__}, transformers {transformers.__version__}, TRL {md.version('trl')}; "
          f"{args.threads} threads; {s['steps']} steps x {repeats} repeats; load average {os.getloadavg()}",
          flush=True)
    results = {}
    for trainer in args.trainers.split(","):
        for rep in range(repeats):
            for impl in ("ours", "trl") if rep % 2 == 0 else ("trl", "ours"):
                r = spawn(impl, trainer, work, work / "runs" / f"{trainer}-{impl}-{rep}", args)
                results.setdefault((impl, trainer), []).append(r)
                print(f"{trainer} {impl} #{rep}: {fmt_steps(r['step_s'])} s/step, {r['rss_mib']:.0f} MiB, "
                      f"outcome {r['outcome']:.4f} (wall {r['wall_s']:.0f} s, load {os.getloadavg()[0]:.2f})",
                      flush=True)
    print()
    print(table(results))
    raw = {f"{k[0]}/{k[1]}": v for k, v in results.items()}
    (work / "results.json").write_text(json.dumps(raw, indent=1))
    if args.json:
        rows = []
        for trainer in TRAINERS:
            runs = {impl: results.get((impl, trainer)) for impl in ("ours", "trl")}
            if not all(runs.values()):
                continue
            rows.append({"trainer": trainer, "outcome": OUTCOME[trainer], "target": TARGET[trainer],
                         **{f"{impl}_{key}": value for impl, rs in runs.items() for key, value in (
                             ("s_per_step", statistics.median(t for r in rs for t in r["step_s"])),
                             ("rss_mib", max(r["rss_mib"] for r in rs)),
                             ("outcome", statistics.mean(r["outcome"] for r in rs)))}})
        Path(args.json).write_text(json.dumps({"rows": rows, "raw": raw, "threads": args.threads,
                                               "steps": s["steps"], "repeats": repeats, "quick": args.quick}, indent=1))


if __name__ == "__main__":
    main()
