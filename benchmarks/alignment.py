"""Do the shipped presets align? RM accuracy, PPO/GRPO reward gain vs KL, DPO accuracy vs KL.
(`--algos grpo,rloo,reinforce-pp` measures RLOO's and REINFORCE++'s presets next to GRPO's;
`grpo@policy_loss=spo` is GRPO's preset with that key; `--family llama` makes the policy's base a Llama
checkpoint written by transformers and pretrained like the PaLM one.)

    python benchmarks/alignment.py --quick                     # smoke run: minutes on a laptop CPU
    nice -n 5 python benchmarks/alignment.py                   # the presets' own step counts, 3 seeds
    python benchmarks/alignment.py --rm-steps 2000 --jobs 9    # the issue-19 targets, parallel runs

The policy's base (configs/pretrain/tiny-stdlib.yaml) and the reward model's (`--rm-base`, default
configs/pretrain/small-stdlib.yaml: a 0.2M-parameter RM does not hold the word rule) are pretrained
once and cached (`--cache`, default /tmp/palm-rlhf-cache/alignment). For each hidden rule, pairs of
completions sampled from the policy's base are labelled by the rule (ties dropped); held-out pairs
come from prompts never used for training. Then for each seed, exactly as a user would, through the
CLI with nothing but the shipped preset, paths, a step count, the seed and the response length:

    reward train --config pairwise (model = the RM base)  -> held-out pairwise accuracy
    ppo  --config ppo  (reward_model = that RM)   -> mean reward gain (rule and RM) and KL
    grpo --config grpo (reward_model = that RM)   -> the same
    dpo  --config dpo                   -> held-out implicit-reward accuracy and KL

DPO can take another preset and more pairs of its own, on the same prompts and held-out pairs:
`--dpo-config dpo-full --dpo-samples-per-prompt 64 --dpo-steps 16000` trains the most accurate
implicit reward measured (on fresh held-out pairs, seeds 0-2: word 0.910, format 0.924-0.965,
vowel 0.940-0.956; see benchmarks/README.md#alignment).

Accuracies are measured again, with standard errors, on pairs no run trains on: `--more-draws` fresh
pairs on each held-out prompt, and (DPO) fresh pairs on training prompts, next to its trained pairs.

Reward gain: mean score over `--eval-prompts` held-out prompts (one sample each, temperature 1)
after minus before, with its standard error. KL: `palm_rlhf.rl.kl.sequence_kl` on those samples,
sum over the response of log pi(y_t) - log ref(y_t) (ref = the pretrained model), nats/sequence.

The rules are this file's own (the issue keeps its rules private; these are not in the library):
    vowel   share of vowels among the characters            (a byte-count shortcut solves it)
    word    share of space-separated words that are lowercase letters, >= 3 long   (word-level)
    format  share of lines with balanced brackets and no trailing spaces     (format)
    keyword share of words that are Python keywords (--rules keyword; too sparse for a barely
            trained model: 5 of 96 sampled pairs differed after 60 pretraining steps)
"""

from __future__ import annotations

import argparse
import functools
import json
import keyword
import math
import multiprocessing
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import torch  # noqa: E402

ALGOS = ("ppo", "grpo", "dpo")  # the default --algos; rloo, reinforce-pp, tpo and flowrl run on request
ALL_ALGOS = ("ppo", "grpo", "rloo", "reinforce-pp", "tpo", "flowrl", "dpo")
KEYWORDS = set(keyword.kwlist) | {"self", "None", "True", "False"}


# ---------------------------------------------------------------- hidden rules


def balanced_line(line: str) -> bool:
    """Brackets balance and no trailing whitespace."""
    depth = 0
    for c in line:
        depth += (c in "([{") - (c in ")]}")
        if depth < 0:
            return False
    return depth == 0 and line == line.rstrip()


# Every rule is a share: the good units of a completion over its units (how it splits, what is good).
UNITS = {
    "vowel": (list, lambda c: c in "aeiou"),
    "word": (str.split, lambda w: w.isalpha() and w.islower() and len(w) >= 3),
    "format": (lambda text: text.split("\n"), balanced_line),
    "keyword": (lambda text: re.findall(r"[A-Za-z_]+", text), KEYWORDS.__contains__),
}


def good_units(rule: str, text: str) -> tuple[int, int]:
    """(good units, units) of `text` under `rule`."""
    split, good = UNITS[rule]
    units = split(text)
    return sum(map(good, units)), len(units)


def rule_score(rule: str, text: str) -> float:
    good, n = good_units(rule, text)
    return good / n if n else 0.0


def unit_fit(rule: str, records, margins: torch.Tensor) -> dict:
    """How much of DPO's implicit reward the rule's units explain: the least-squares fit of each pair's
    margin (chosen minus rejected) on its difference in good and in bad units. `fit_accuracy` is how many
    pairs the fitted part alone orders right; `r2` the share of the margins' variance it explains."""
    units = torch.tensor([[*good_units(rule, r.chosen), *good_units(rule, r.rejected)] for r in records],
                         dtype=torch.float64)
    good, bad = units[:, 0] - units[:, 2], (units[:, 1] - units[:, 0]) - (units[:, 3] - units[:, 2])
    x, y = torch.stack([good, bad], 1), margins.double()
    coef = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
    fitted = x @ coef
    return {"per_good": float(coef[0]), "per_bad": float(coef[1]),
            "fit_accuracy": float((fitted > 0).double().mean()),
            "r2": float(1 - (y - fitted).pow(2).sum() / (y - y.mean()).pow(2).sum()),
            "residual_sd": float((y - fitted).std()), "residuals": (y - fitted).tolist()}


def residual_agreement(results: list[dict]) -> list[str]:
    """Per rule, the correlation between seeds of the unexplained part of DPO's held-out margins: near 0
    if it is each run's own noise, near 1 if every run learns the same thing besides the rule."""
    lines = []
    for rule in dict.fromkeys(r["rule"] for r in results):
        runs = [(r["seed"], r["dpo"]["unit_fit"]["residuals"]) for r in results
                if r["rule"] == rule and "residuals" in r["dpo"].get("unit_fit", {})]
        corrs = [f"seeds {a}-{b} {statistics.correlation(x, y):.2f}"
                 for i, (a, x) in enumerate(runs) for b, y in runs[i + 1:]]
        if corrs:
            lines.append(f"- {rule}: " + ", ".join(corrs))
    return ["", "The unexplained part's correlation between seeds (the same held-out pairs):", *lines] if lines else []


RULES = {rule: functools.partial(rule_score, rule) for rule in UNITS}


# ---------------------------------------------------------------- helpers


def cli(args: list[str], log_path: Path, threads: int) -> None:
    """One palm-rlhf command, as a user types it; its output goes to `log_path`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    with open(log_path, "a") as log:
        log.write("$ palm-rlhf " + " ".join(args) + "\n")
        log.flush()
        done = subprocess.run([sys.executable, "-m", "palm_rlhf", *args], stdout=log, stderr=subprocess.STDOUT,
                              env=env, cwd=REPO)
    if done.returncode:
        tail = log_path.read_text().splitlines()[-15:]
        raise RuntimeError(f"palm-rlhf {args[0]} failed (exit {done.returncode}):\n" + "\n".join(tail))


def mean_se(values) -> tuple[float, float]:
    values = [float(v) for v in values]
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return statistics.fmean(values), se


def pretrain(cache: Path, preset: str, steps: int, threads: int, family: str = "palm") -> Path:
    """The preset pretrained for `steps`; `family=llama` starts it from a Llama checkpoint that transformers
    builds with the preset's sizes (`llama_checkpoint`), so the policy is a family model."""
    out = cache / f"pretrain-{preset}-{steps}" if family == "palm" else cache / f"pretrain-{preset}-{family}-{steps}"
    if not (out / "final" / "config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        init = [f"init_from={llama_checkpoint(out / 'llama', preset)}"] if family == "llama" else []
        cli(["pretrain", "--config", f"configs/pretrain/{preset}.yaml", f"out_dir={out}", f"max_steps={steps}",
             "progress=false", *init],
            cache / "pretrain.log", threads)
    return out


def llama_checkpoint(out: Path, preset: str) -> Path:
    """A LlamaForCausalLM written by transformers (random weights, seed 0) with the preset's width, depth and
    heads, half as many KV heads (grouped-query attention), untied embeddings and the byte vocabulary."""
    import transformers
    import yaml

    m = yaml.safe_load((REPO / "configs" / "pretrain" / f"{preset}.yaml").read_text())["model"]
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=m["dim"], num_hidden_layers=m["depth"],
                                      num_attention_heads=m["heads"], num_key_value_heads=max(1, m["heads"] // 2),
                                      head_dim=m["dim_head"], intermediate_size=4 * m["dim"],
                                      max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    return out


def load_base(pre: Path):
    from palm_rlhf.data.tokenizer import load_tokenizer
    from palm_rlhf.model import PaLM

    return PaLM.from_pretrained(pre / "final").eval(), load_tokenizer(pre / "final")


def snippets(pre: Path, tokenizer, n: int, size: int, seed: int) -> list[str]:
    """`n` distinct prompts: `size`-byte snippets of the held-out split starting at a line start."""
    from palm_rlhf.data.corpus import load_tokens

    tokens = load_tokens(pre / "data", "val")
    text = tokenizer.decode(tokens[: min(len(tokens), 400_000)].tolist())
    starts = [i + 1 for i, c in enumerate(text) if c == "\n" and i + 1 + size < len(text)]
    random.Random(seed).shuffle(starts)
    out, seen = [], set()
    for s in starts:
        snippet = text[s:s + size]
        if snippet.strip() and "\x00" not in snippet and snippet not in seen:
            seen.add(snippet)
            out.append(snippet)
        if len(out) == n:
            return out
    raise RuntimeError(f"only {len(out)} distinct prompts in the held-out split; ask for fewer")


class Policy(NamedTuple):
    """A model to sample from and score against its reference. A LoRA run is the base with its `actor`
    scope, against the same model with LoRA disabled; a full-finetune run (`lora.r=0`) is its own
    model, against the base (`reference`)."""
    model: torch.nn.Module
    scope: str | None = None
    reference: torch.nn.Module | None = None

    def log_probs(self, packed):
        """Per-token log-probs of the packed responses: (policy's, reference's), through the trainers' scorer."""
        from types import SimpleNamespace

        from palm_rlhf.generation.scoring import Scorer

        reference = SimpleNamespace(model=self.reference or self.model, scope=None,
                                    disable_lora=self.reference is None)
        scorer = Scorer(self.model, self.scope, reference=reference)
        return scorer.policy(packed)[0], scorer.reference_log_probs(packed)


def finished(run: Path) -> bool:
    """A run's policy is saved: a LoRA adapter, or a whole finetuned model in final/."""
    return adapter_exists(run) or (run / "final" / "model.safetensors").is_file()


def load_policy(base, run: Path) -> Policy:
    """The policy `run` trained on top of `base` (a LoRA adapter is loaded into `base`'s actor scope)."""
    from palm_rlhf.model import PaLM
    from palm_rlhf.model.checkpoint import load_adapter

    if adapter_exists(run):
        load_adapter(base, adapter_of(run), scope="actor")
        return Policy(base, "actor")
    return Policy(PaLM.from_pretrained(run / "final").eval(), reference=base)


@torch.no_grad()
def sample(policy: Policy, tokenizer, prompts: list[str], tokens: int, seed: int, log_probs: bool = True):
    """One completion per prompt (temperature 1); texts, the policy's and the reference's log-probs, mask
    (only the texts when `log_probs` is false)."""
    from palm_rlhf.generation import SamplingConfig, generate
    from palm_rlhf.rl.collect import right_pad
    from palm_rlhf.generation.scoring import pack_sequences

    texts, logp, ref, masks = [], [], [], []
    for i in range(0, len(prompts), 64):
        ids = [torch.tensor(tokenizer.encode(p)) for p in prompts[i:i + 64]]
        out = generate(policy.model, ids, SamplingConfig(max_new_tokens=tokens, temperature=1.0, seed=seed + i),
                       finetune_scope=policy.scope)
        texts += [tokenizer.decode(row[:k].tolist()) for row, k in zip(out.tokens, out.lengths.tolist())]
        if not log_probs:
            continue
        pol, base = policy.log_probs(pack_sequences(*right_pad(ids), out.tokens, out.mask))
        width = tokens  # rows of every chunk padded to the same width for one (b, T) tensor
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
        logp.append(pad(pol.float()))
        ref.append(pad(base.float()))
        masks.append(pad(out.mask.long()).bool())
    if not log_probs:
        return texts, None, None, None
    return texts, torch.cat(logp), torch.cat(ref), torch.cat(masks)


def prompt_split(pre: Path, tokenizer, args) -> tuple[list[str], list[str], list[str]]:
    """Training, held-out and evaluation prompts: disjoint, the same on every run with these flags."""
    prompts = snippets(pre, tokenizer, args.pairs + args.heldout_pairs + args.eval_prompts, args.prompt_bytes, seed=1)
    held = args.pairs + args.heldout_pairs
    return prompts[: args.pairs], prompts[args.pairs: held], prompts[held:]


def label(rule: str, prompts: list[str], first: list[str], second: list[str]):
    """The rule's preference on two completions per prompt, chosen first; tied pairs dropped."""
    from palm_rlhf.data.preferences import PairwiseRecord

    score = RULES[rule]
    return [PairwiseRecord(p, x, y, annotator=f"rule:{rule}") if score(x) > score(y) else
            PairwiseRecord(p, y, x, annotator=f"rule:{rule}")
            for p, x, y in zip(prompts, first, second) if score(x) != score(y)]


def draw_pairs(model, tok, rule: str, prompts: list[str], draws: int, tokens: int, seed: int) -> list:
    """`draws` labelled pairs per prompt, each of two fresh samples (seeds seed + 10 k, seed + 1 + 10 k)."""
    records = []
    for k in range(draws):
        a, *_ = sample(Policy(model), tok, prompts, tokens, seed=seed + 10 * k, log_probs=False)
        b, *_ = sample(Policy(model), tok, prompts, tokens, seed=seed + 1 + 10 * k, log_probs=False)
        records += label(rule, prompts, a, b)
    return records


def make_pairs(pre: Path, rule: str, out: Path, args) -> dict:
    """Train/held-out preference pairs and RL prompts for one rule (cached)."""
    from palm_rlhf.data.preferences import write_preferences

    if (out / "pairs.json").is_file():
        return json.loads((out / "pairs.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_base(pre)
    train_p, held_p, eval_p = prompt_split(pre, tok, args)
    info = {}
    for name, group, draws in (("train", train_p, args.samples_per_prompt), ("val", held_p, 1)):
        records = draw_pairs(model, tok, rule, group, draws, args.tokens, seed=2)
        if len(records) < 2:
            raise RuntimeError(f"{rule}: only {len(records)} of {len(group)} sampled {name} pairs differ under the "
                               f"rule; pretrain longer (--pretrain-steps) or sample more (--pairs, --tokens)")
        write_preferences(out / f"{name}.jsonl", records)
        info[name] = len(records)
    with open(out / "prompts.jsonl", "w") as f:  # RL trains on the training prompts only
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in train_p)
    (out / "eval_prompts.json").write_text(json.dumps(eval_p))
    (out / "pairs.json").write_text(json.dumps(info))
    return info


def make_more_pairs(pre: Path, rule: str, out: Path, args) -> dict[str, Path]:
    """Pairs no run trains on, for tighter accuracy figures (cached next to the training pairs):
    held_more  `--more-draws` fresh pairs on each held-out prompt (183 held-out pairs give a standard
               error of 0.02 at 90%);
    train_new  fresh pairs on the first `--new-completion-prompts` training prompts: what DPO learned of
               the prompts it saw, apart from the completions it saw."""
    from palm_rlhf.data.preferences import write_preferences

    wanted = {"held_more": (f"val-more{args.more_draws}.jsonl", args.more_draws, 1000),
              "train_new": (f"train-new{args.new_completion_prompts}.jsonl",
                            2 if args.new_completion_prompts else 0, 2000)}
    model = None
    for key, (name, draws, seed) in wanted.items():
        if draws and not (out / name).is_file():
            if model is None:
                model, tok = load_base(pre)
                train_p, held_p, _ = prompt_split(pre, tok, args)
            prompts = held_p if key == "held_more" else train_p[: args.new_completion_prompts]
            records = draw_pairs(model, tok, rule, prompts, draws, args.tokens, seed)
            if records:  # all tied: nothing to measure on
                write_preferences(out / name, records)
    return {key: out / name for key, (name, draws, _) in wanted.items() if draws and (out / name).is_file()}


def adapter_of(run: Path) -> Path:
    for path in (run / "final" / "adapter.safetensors", run / "actor.safetensors"):
        if path.is_file():
            return path
    raise RuntimeError(f"{run}: no trained adapter (final/adapter.safetensors or actor.safetensors)")


# ---------------------------------------------------------------- one (rule, seed) job


def job(pre: Path, rm_pre: Path, rule: str, seed: int, work: Path, more_pairs: dict[str, Path], dpo_data: Path,
        args, threads: int) -> dict:
    from palm_rlhf.data.preferences import read_preferences
    from palm_rlhf.model.reward import RewardModel
    from palm_rlhf.rl.kl import sequence_kl

    torch.set_num_threads(threads)
    data = work.parent
    log = work / "commands.log"
    work.mkdir(parents=True, exist_ok=True)
    common = [f"seed={seed}", "progress=false"]
    rm_dir = work / "rm"
    if not (rm_dir / "final").is_dir():
        cli(["reward", "train", "--config", "configs/reward/pairwise.yaml", f"model={rm_pre / 'final'}",
             f"data={data / 'train.jsonl'}", f"eval.data={data / 'val.jsonl'}", f"out_dir={rm_dir}",
             f"max_steps={args.rm_steps}", *common], log, threads)
    rm = RewardModel.from_pretrained(rm_dir / "final", dropout=0.0).eval()
    val = read_preferences(data / "val.jsonl")
    tok_base = load_base(pre)[1]
    enc = lambda s: torch.tensor(tok_base.encode(s))  # noqa: E731
    more = {key: read_preferences(path) for key, path in more_pairs.items()}

    @torch.no_grad()
    def rm_accuracy(records) -> float:
        chosen = rm.score([enc(r.prompt) for r in records], [enc(r.chosen) for r in records])
        rejected = rm.score([enc(r.prompt) for r in records], [enc(r.rejected) for r in records])
        return float((chosen > rejected).float().mean())

    result = {"rule": rule, "seed": seed, "rm_accuracy": rm_accuracy(val), "rm_curve": curve(rm_dir, "val/accuracy"),
              "more": {key: {"n": len(records), "rm_accuracy": rm_accuracy(records)} for key, records in more.items()}}

    stage(args, {"rule": rule, "seed": seed, "stage": "rm", "rm_accuracy": result["rm_accuracy"]})

    prompts = json.loads((data / "eval_prompts.json").read_text())
    score = RULES[rule]
    model, tok = load_base(pre)
    texts, *_ = sample(Policy(model), tok, prompts, args.tokens, seed=100 + seed)
    rule_before = mean_se(map(score, texts))
    rm_before = mean_se(rm.score([enc(p) for p in prompts], [enc(t) for t in texts]).tolist())
    result["before"] = {"rule": rule_before, "rm": rm_before}
    for spec in args.algos.split(","):  # train, then measure at once: an interrupted benchmark keeps what finished
        algo, *variant = spec.split("@")  # grpo@policy_loss=spo: the preset with keys of its own
        extra = [kv.split(":", 1)[1] for kv in args.set if kv.split(":", 1)[0] == algo] + variant
        out = work / ((dpo_run_name(args) if algo == "dpo" else algo) + "".join(f"-{kv}" for kv in extra))
        if not finished(out):
            keys = [f"out_dir={out}", f"max_steps={args.rl_steps if algo != 'dpo' else args.dpo_steps}", *common,
                    *extra]
            if algo == "dpo":
                keys += [f"data={dpo_data / 'train.jsonl'}", f"eval.data={data / 'val.jsonl'}"]
            else:
                keys += [f"prompts={data / 'prompts.jsonl'}", f"reward_model={rm_dir / 'final'}",
                         f"max_new_tokens={args.tokens}"]
            preset = args.dpo_config if algo == "dpo" else algo
            cli([algo, "--config", f"configs/rl/{preset}.yaml", f"model={pre / 'final'}", *keys], log, threads)
        policy = load_policy(model, out)
        texts, logp, ref, mask = sample(policy, tok, prompts, args.tokens, seed=100 + seed)
        kl = sequence_kl(logp, ref, mask)
        rule_after = mean_se(map(score, texts))
        rm_after = mean_se(rm.score([enc(p) for p in prompts], [enc(t) for t in texts]).tolist())
        row = {"kl": kl.mean, "kl_se": kl.stderr, "rule_after": rule_after, "rm_after": rm_after,
               "rule_gain": rule_after[0] - rule_before[0], "rm_gain": rm_after[0] - rm_before[0],
               "rule_gain_se": math.hypot(rule_after[1], rule_before[1]),
               "rm_gain_se": math.hypot(rm_after[1], rm_before[1]), "sample": texts[0]}
        if algo == "dpo":
            margins = dpo_margins(policy, tok, val)
            row["heldout_accuracy"] = float((margins > 0).float().mean())
            train = read_preferences(dpo_data / "train.jsonl")[:1000]  # all of them under --quick
            row["train_accuracy"] = float((dpo_margins(policy, tok, train) > 0).float().mean())
            row["unit_fit"] = unit_fit(rule, val, margins)
            for key, records in more.items():
                result["more"][key]["dpo_accuracy"] = float((dpo_margins(policy, tok, records) > 0).float().mean())
            row["curve"] = curve(out, "heldout_reward_accuracy")
            row["kl_curve"] = curve(out, "kl_ref")
        result[spec] = row
        if policy.scope:
            model.remove_finetune_params(policy.scope)
        stage(args, {"rule": rule, "seed": seed, "stage": spec, **{k: v for k, v in row.items() if k != "sample"}})
    (work / "result.json").write_text(json.dumps(result, indent=2))
    return result


def stage(args, row: dict) -> None:
    """One finished measurement, appended to OUT/stages.jsonl at once (survives a killed benchmark)."""
    with open(Path(args.out) / "stages.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def curve(run: Path, key: str) -> list:
    """[(step, value)] of `key` in RUN/metrics.jsonl (how a metric moved during training)."""
    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]


def adapter_exists(run: Path) -> bool:
    try:
        adapter_of(run)
        return True
    except RuntimeError:
        return False


@torch.no_grad()
def dpo_margins(policy: Policy, tok, records, chunk: int = 512) -> torch.Tensor:
    """Per pair, the DPO trainer's implicit-reward margin (over beta): the summed log-ratio (policy vs
    reference) of chosen + EOS minus that of rejected + EOS (`encode_pair`); right where > 0."""
    from palm_rlhf.rl.collect import right_pad
    from palm_rlhf.generation.scoring import pack_sequences
    from palm_rlhf.trainers.dpo import DPOConfig, encode_pair

    def ratio(rows, side: int):
        prompts = [torch.tensor(row[side][0]) for row in rows]
        resp, lengths = right_pad([torch.tensor(row[side][1]) for row in rows])
        pol, ref = policy.log_probs(pack_sequences(*right_pad(prompts), resp,
                                                   torch.arange(resp.shape[1]) < lengths[:, None]))
        return (pol - ref).sum(-1)

    max_len, margins = DPOConfig().max_len, []
    for start in range(0, len(records), chunk):
        rows = [encode_pair(r, tok, max_len) for r in records[start:start + chunk]]
        margins.append(ratio(rows, 0) - ratio(rows, 1))
    return torch.cat(margins)


# ---------------------------------------------------------------- report


def first_at(points: list, target: float) -> str:
    """" [>=target@step]": the first logged step whose value reached target ("" if none did)."""
    step = next((st for st, v in points if v >= target), None)
    return "" if step is None else f" [>={target:g}@{step}]"


def binomial(p: float, n: int) -> str:
    """An accuracy on n pairs with its standard error."""
    return f"{p:.3f} ± {math.sqrt(p * (1 - p) / n):.3f}" if n else "-"


def more_table(results: list[dict]) -> list[str]:
    """The accuracies again on pairs no run trained on (`make_more_pairs`), with standard errors."""
    rows = [r for r in results if r.get("more", {}).get("held_more", {}).get("n") and "dpo" in r]
    if not rows:
        return []
    lines = ["", "Accuracy on more pairs, none trained on: fresh pairs on the held-out prompts (n), and DPO on "
             "fresh pairs of training prompts (new completions) next to its trained pairs", "",
             "| rule | seed | RM held-out | RM more held-out (n) | DPO held-out | DPO more held-out | "
             "DPO trained pairs | DPO new completions (n) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        held, new = r["more"]["held_more"], r["more"].get("train_new", {"n": 0})
        lines.append(f"| {r['rule']} | {r['seed']} | {r['rm_accuracy']:.3f} | "
                     f"{binomial(held['rm_accuracy'], held['n'])} ({held['n']}) | {r['dpo']['heldout_accuracy']:.3f} | "
                     f"{binomial(held['dpo_accuracy'], held['n'])} | {r['dpo']['train_accuracy']:.3f} | "
                     f"{binomial(new.get('dpo_accuracy', 0.0), new['n'])} ({new['n']}) |")
    return lines


def report(results: list[dict], out: Path) -> str:
    specs = dict.fromkeys(k for r in results for k in r if k.split("@")[0] in ALL_ALGOS)
    algos = [a for a in specs if all(a in r for r in results)]
    lines = ["| rule | seeds | RM acc | algo | rule gain (x SE) | RM gain (x SE) | KL nats/seq | DPO held-out acc |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for rule in dict.fromkeys(r["rule"] for r in results):
        rows = [r for r in results if r["rule"] == rule]
        acc = ", ".join(f"{r['rm_accuracy']:.3f}" + first_at(r["rm_curve"], 0.95) for r in rows)
        for algo in algos:
            gain = ", ".join(f"{r[algo]['rule_gain']:+.3f} ({r[algo]['rule_gain'] / max(r[algo]['rule_gain_se'], 1e-9):+.1f})"
                             for r in rows)
            rm_gain = ", ".join(f"{r[algo]['rm_gain']:+.2f} ({r[algo]['rm_gain'] / max(r[algo]['rm_gain_se'], 1e-9):+.1f})"
                                for r in rows)
            kl = ", ".join(f"{r[algo]['kl']:.1f}" for r in rows)
            dpo = ", ".join(f"{r[algo]['heldout_accuracy']:.3f}" + first_at(r[algo]["curve"], 0.90)
                            for r in rows) if algo == "dpo" else ""
            lines.append(f"| {rule} | {','.join(str(r['seed']) for r in rows)} | {acc} | {algo} | {gain} | "
                         f"{rm_gain} | {kl} | {dpo} |")
    fits = [f"| {r['rule']} | {r['seed']} | {r['dpo']['train_accuracy']:.3f} | {r['dpo']['heldout_accuracy']:.3f} | "
            f"{f['per_good']:+.2f}, {f['per_bad']:+.2f} | {f['fit_accuracy']:.3f} | {f['r2']:.2f} | "
            f"{f['residual_sd']:.2f} |" for r in results if "unit_fit" in r.get("dpo", {}) for f in [r["dpo"]["unit_fit"]]]
    if fits:
        lines += ["", "DPO's implicit reward against the rule's units: its margin (log-ratio, chosen minus rejected) "
                  "fitted on the pair's difference in good and in bad units, on the held-out pairs",
                  "", "| rule | seed | train acc (first 1,000 pairs) | held-out acc | nats per good, bad unit | "
                  "fitted part's acc | R^2 | residual sd |", "| --- | --- | --- | --- | --- | --- | --- | --- |",
                  *fits, *residual_agreement(results)]
    lines += more_table(results)
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return table + "\n(matplotlib not installed: no plots)"
    for algo in algos:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for rule in dict.fromkeys(r["rule"] for r in results):
            pts = [(r[algo]["kl"], r[algo]["rm_gain"]) for r in results if r["rule"] == rule]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=rule)
        ax.axvline(10.0, color="grey", ls=":", lw=1)
        ax.set_xlabel("KL to the pretrained model (nats / sequence)")
        ax.set_ylabel("reward-model score gain")
        ax.set_title(f"{algo}: reward gain vs KL (one point per seed)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"reward_vs_kl_{algo}.png", dpi=100)
        plt.close(fig)
    return table


def pairs_tag(args, draws: int) -> str:
    """The cache folder of the pairs these flags make, with `draws` training pairs per training prompt."""
    return f"p{args.pairs}x{draws}-h{args.heldout_pairs}-e{args.eval_prompts}-t{args.tokens}-b{args.prompt_bytes}"


def dpo_draws(args) -> int:
    return args.dpo_samples_per_prompt or args.samples_per_prompt


def dpo_run_name(args) -> str:
    """`dpo` for the preset on the reward model's pairs (the cached runs keep their name), else the preset
    and DPO's pairs per prompt."""
    if args.dpo_config == "dpo" and dpo_draws(args) == args.samples_per_prompt:
        return "dpo"
    return f"dpo-{args.dpo_config}-x{dpo_draws(args)}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few steps and pairs: a smoke run in minutes")
    p.add_argument("--rules", default="vowel,word,format")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--pretrain-steps", type=int, default=300)  # the pretrain presets' own
    p.add_argument("--rm-base", default="small-stdlib",
                   help="pretrain preset of the reward model's base (same tokenizer as tiny-stdlib's)")
    p.add_argument("--rm-steps", type=int, default=2000)       # the bound (the preset's max_steps: 300)
    p.add_argument("--algos", default=",".join(ALGOS),
                   help=f"comma-separated, of {', '.join(ALL_ALGOS)} (each through its configs/rl preset); "
                        f"ALGO@KEY=VALUE[@KEY=VALUE] runs the preset with those keys (grpo@policy_loss=spo)")
    p.add_argument("--family", choices=("palm", "llama"), default="palm",
                   help="the policy's base: the PaLM preset, or a Llama built by transformers and pretrained alike")
    p.add_argument("--set", action="append", default=[], metavar="ALGO:KEY=VALUE",
                   help="a key for one algorithm's runs, after its preset (e.g. rloo:kl_coef=1.0); repeatable")
    p.add_argument("--rl-steps", type=int, default=200)        # configs/rl/{ppo,grpo}.yaml's
    p.add_argument("--dpo-steps", type=int, default=2000)      # configs/rl/dpo.yaml's
    p.add_argument("--dpo-config", default="dpo", help="DPO's preset, configs/rl/NAME.yaml")
    p.add_argument("--dpo-samples-per-prompt", type=int,
                   help="DPO's own training pairs per training prompt (default: --samples-per-prompt); "
                        "the same prompts and held-out pairs")
    p.add_argument("--pairs", type=int, default=4096, help="prompts sampled for training pairs")
    p.add_argument("--samples-per-prompt", type=int, default=4,
                   help="training pairs drawn per training prompt (held-out prompts: one pair each)")
    p.add_argument("--heldout-pairs", type=int, default=256)
    p.add_argument("--eval-prompts", type=int, default=128)
    p.add_argument("--more-draws", type=int, default=8,
                   help="fresh pairs per held-out prompt, for accuracy figures with a smaller standard error")
    p.add_argument("--new-completion-prompts", type=int, default=1024,
                   help="training prompts given fresh pairs (two each): DPO's accuracy off its trained pairs")
    p.add_argument("--prompt-bytes", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32, help="response length (pairs, RL, evaluation)")
    p.add_argument("--jobs", type=int, default=1, help="(rule, seed) jobs run in parallel processes")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "palm-rlhf-cache" / "alignment"))
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "palm-rlhf-alignment"))
    if p.parse_known_args()[0].quick:  # smaller defaults; flags given still win
        p.set_defaults(pretrain_steps=60, rm_steps=40, rl_steps=4, dpo_steps=20, pairs=128, samples_per_prompt=1,
                       heldout_pairs=32, eval_prompts=32, tokens=16, seeds="0", more_draws=2,
                       new_completion_prompts=32)
    args = p.parse_args()
    unknown = {a.split("@")[0] for a in args.algos.split(",")} - set(ALL_ALGOS)
    if unknown:
        p.error(f"--algos: unknown {sorted(unknown)}; use some of {', '.join(ALL_ALGOS)}")
    cache, out = Path(args.cache), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cores = int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1  # OMP_NUM_THREADS=1 on a shared box
    threads = max(1, cores // max(1, args.jobs))
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {args.jobs} jobs x {threads} threads, "
          f"cuda={torch.cuda.is_available()}", flush=True)
    pre = pretrain(cache, "tiny-stdlib", args.pretrain_steps, cores, args.family)
    rm_pre = pretrain(cache, args.rm_base, args.pretrain_steps, cores)
    rules, seeds = args.rules.split(","), [int(s) for s in args.seeds.split(",")]
    tag = pairs_tag(args, args.samples_per_prompt)
    dpo_args = argparse.Namespace(**{**vars(args), "samples_per_prompt": dpo_draws(args)})
    more = {}
    for rule in rules:
        print(f"{rule}: pairs {make_pairs(pre, rule, cache / f'{pre.name}-{tag}' / rule, args)}", flush=True)
        if dpo_draws(args) != args.samples_per_prompt:
            dpo_pairs = make_pairs(pre, rule, cache / f"{pre.name}-{pairs_tag(args, dpo_draws(args))}" / rule, dpo_args)
            print(f"{rule}: DPO's pairs {dpo_pairs}", flush=True)
        more[rule] = make_more_pairs(pre, rule, cache / f"{pre.name}-{tag}" / rule, args)
    runs = f"run-{args.rm_steps}-{args.rl_steps}-{args.dpo_steps}-rm-{args.rm_base}"
    tasks = [(pre, rm_pre, rule, seed, cache / f"{pre.name}-{tag}" / rule / f"{runs}-s{seed}", more[rule],
              cache / f"{pre.name}-{pairs_tag(args, dpo_draws(args))}" / rule, args, threads)
             for rule in rules for seed in seeds]
    results = []
    # spawn, not fork: a forked child of a process that already ran torch ops can hang in its thread pool
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(job, *t): t for t in tasks}
        for future in as_completed(futures):
            _, _, rule, seed, work, *_ = futures[future]
            try:
                result = future.result()
            except Exception as e:  # one failed run must not hide the others' figures
                print(f"{rule} seed {seed} failed: {e} (commands and output: {work / 'commands.log'})", flush=True)
                continue
            results.append(result)
            with open(out / "partial.jsonl", "a") as f:  # figures survive an interrupted benchmark
                f.write(json.dumps(result) + "\n")
            algos = args.algos.split(",")
            print(f"{rule} seed {seed}: " + json.dumps({k: v for k, v in result.items() if k not in (*algos, "rm_curve")})
                  + " " + json.dumps({a: {k: result[a][k] for k in ("kl", "rule_gain", "rm_gain")} for a in algos}),
                  flush=True)
    results.sort(key=lambda r: (rules.index(r["rule"]), r["seed"]))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(report(results, out))
    print(f"results, table and plots in {out}")


if __name__ == "__main__":
    main()
