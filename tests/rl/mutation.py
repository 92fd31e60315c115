"""Mutation check for the RL code: do the RL tests fail when a bug that matters is put in on purpose?

    .venv/bin/python tests/rl/mutation.py              # every mutant (about 10-20 minutes on 2 busy cores)
    .venv/bin/python tests/rl/mutation.py --list       # the mutants, one line each
    .venv/bin/python tests/rl/mutation.py ppo-entropy-sign dpo-mean-log-probs   # some of them

Not a test (pytest does not collect it: no test_ prefix) and not run in CI. It copies `palm_rlhf/`,
`tests/` and `pyproject.toml` to a temporary directory, checks that the RL tests pass there, then
for each mutant edits ONE source line or block of the copy (`palm_rlhf/rl/` or an RL trainer), runs
the RL tests with `-x` (stopping at the first failure), and restores the file. A mutant is KILLED
when a test fails, SURVIVED when all pass, NOT APPLIED when its source text is no longer in the
file (the code moved: update the mutant). Exit status 1 when any mutant survived or was not applied.

Each mutant is a bug that published RLHF code has shipped (see issue 17); a new behaviour worth
pinning gets a mutant here and a test that kills it.

Last run: 2026-11-27 14:14 UTC, after merging issue 14, torch 2.13 CPU, OMP_NUM_THREADS=1, 2 cores shared
with other jobs; unmutated RL tests 142 s wall. 25/25 killed, no survivors (so SURVIVORS is empty). The
first test that failed for each (with -x; later tests may catch it too: run with
--pytest-args "-k uneven" to see test_rl_distributed's stub-rollout test kill the six distributed ones alone):
    ppo-entropy-sign                      rl/test_loss_terms.py::test_ppo_loss_is_policy_plus_value_minus_entropy
    grpo-entropy-sign                     rl/test_loss_terms.py::test_grpo_loss_terms_and_signs
    ppo-drop-value-loss                   rl/test_loss_terms.py::test_ppo_loss_is_policy_plus_value_minus_entropy
    ppo-returns-from-whitened-advantages  rl/test_maths.py::test_ppo_prepare_value_targets_are_raw_advantages_plus_values
    whiten-rewards-removes-mean           rl/test_maths.py::test_ppo_prepare_reward_whitening_keeps_the_mean
    whiten-rewards-ignored                rl/test_maths.py::test_ppo_prepare_reward_whitening_keeps_the_mean
    grpo-ignores-clip-eps-high            rl/test_loss_terms.py::test_grpo_uses_clip_eps_high
    clip-eps-high-ignored                 rl/test_loss_terms.py::test_grpo_uses_clip_eps_high
    kl-controller-every-other-step        trainers/test_ppo.py::test_resume_matches_uninterrupted_run
    kl-controller-n-local-rows            trainers/test_rl_distributed.py::test_two_torchrun_processes_equal_one_process[ppo]
    kl-controller-n-minibatch             trainers/test_ppo.py::test_resume_matches_uninterrupted_run
    kl-controller-token-mean              trainers/test_ppo.py::test_resume_matches_uninterrupted_run
    kl-controller-rank-local              trainers/test_rl_distributed.py::test_two_torchrun_processes_equal_one_process[ppo]
    kl-controller-stale-coef              rl/test_maths.py::test_ppo_prepare_value_targets_are_raw_advantages_plus_values
    dpo-mean-log-probs                    trainers/test_dpo.py::test_sequence_log_probs_sum_for_dpo_and_average_for_ipo[sigmoid]
    ipo-abs                               rl/test_maths.py::test_ipo_squares_the_error_away_from_its_minimum
    best-of-n-worst                       trainers/test_rlhf.py::test_best_of_n_returns_the_highest_scoring_sample
    same-noise-every-rank                 trainers/test_rl_distributed.py::test_two_torchrun_processes_equal_one_process[ppo]
    same-noise-every-row                  trainers/test_ppo.py::test_ppo_raises_vowel_reward_with_bounded_kl
    loss-weight-one-per-rank              trainers/test_ppo.py::test_ppo_raises_vowel_reward_with_bounded_kl
    eos-rate-inverted                     trainers/test_ppo.py::test_ppo_raises_vowel_reward_with_bounded_kl
    response-length-without-eos           trainers/test_ppo.py::test_ppo_raises_vowel_reward_with_bounded_kl
    kl-ref-token-mean                     trainers/test_ppo.py::test_resume_matches_uninterrupted_run
    kl-direction-flipped                  rl/test_loss_terms.py::test_grpo_loss_terms_and_signs
    ppo-min-instead-of-max                rl/test_loss_terms.py::test_grpo_uses_clip_eps_high

Issue 31 (the losses take tensors from generation/scoring.py's Scorer; RLOO and REINFORCE++), 2026-12-07,
the same machine: every mutant applies (none NOT APPLIED); those of the moved and new code were run, all killed:
    ppo-entropy-sign, ppo-drop-value-loss  rl/test_loss_terms.py::test_ppo_loss_is_policy_plus_value_minus_entropy
    grpo-entropy-sign                     rl/test_loss_terms.py::test_grpo_loss_terms_and_signs
    grpo-ignores-clip-eps-high            rl/test_loss_terms.py::test_grpo_uses_clip_eps_high
    dpo-mean-log-probs                    trainers/test_dpo.py::test_sequence_log_probs_sum_for_dpo_and_average_for_ipo[sigmoid]
    same-noise-every-row                  trainers/test_ppo.py::test_ppo_raises_vowel_reward_with_bounded_kl
    loss-weight-one-per-rank              trainers/test_rl_distributed.py::test_two_torchrun_processes_equal_one_process[ppo]
    scorer-temperature-ignored            rl/test_rollout.py::test_recomputed_log_probs_equal_rollout_and_kl_starts_at_zero[0.7]
    scorer-reference-is-the-policy        rl/test_rollout.py::test_frozen_scope_reference_for_pretrained_adapter[seed-lora]
    rloo-baseline-includes-self           rl/test_reinforce_maths.py::test_leave_one_out_baseline_is_the_other_samples_mean
    rloo-kl-ignored                       rl/test_reinforce_maths.py::test_rloo_prepare_puts_the_sequence_kl_in_the_reward
    reinforce-pp-baseline-ignored         rl/test_reinforce_maths.py::test_reinforce_pp_baseline_subtracts_the_group_mean_...
    reinforce-pp-gamma-ignored            rl/test_reinforce_maths.py::test_discounted_returns_stop_at_the_last_real_token
    reinforce-pp-not-whitened             rl/test_reinforce_maths.py::test_reinforce_pp_whitens_kl_shaped_returns_over_the_batch
    reinforce-pp-whiten-rank-local        trainers/test_rl_distributed.py::test_two_torchrun_processes_equal_one_process[reinforce-pp]
    reinforce-entropy-sign                rl/test_reinforce_maths.py::test_policy_gradient_loss_at_ratio_one_is_minus_the_mean_advantage
(A first scorer mutant, `disable_lora=False` for the reference, survived and was dropped: with the
reference's scope None no adapter runs anyway, so it changed nothing.)

Issue 34 (the seed package's methods), 2026-12-07, the same machine, run with --pytest-args "-k seed_methods"
(only tests/rl/test_seed_methods.py; unmutated 19 s): the 16 new mutants spo-* maxrl-* dr-grpo-* entropy-bonus-*
score-centering-* flowrl-* tpo-* all killed, each by the test of its function in rl/test_seed_methods.py; the
wiring mutants, run with --pytest-args="-k(seed_methods)or(grpo_options)" (or (tpo), (flowrl)), all killed:
    grpo-spo-ignored, grpo-entropy-advantage-ignored   rl/test_seed_methods.py::test_grpo_loss_wires_the_options
    grpo-advantage-norm-ignored           trainers/test_grpo_options.py::test_on_policy_spo_and_score_centering_...
    tpo-rows-shuffled                     trainers/test_rl_distributed.py::test_two_torchrun_processes_equal_one_process[tpo]
    flowrl-log-z-not-trained              trainers/test_flowrl.py::test_log_z_trains_and_is_part_of_the_trainable_state
The whole list was not rerun after issue 34 (the unmutated RL tests take minutes on the shared cores).
FlowRL's 1-vs-2-process fix (2026-12-07, --pytest-args="-k (flowrl)or(tpo)"), all killed:
    tpo-rows-shuffled (now in trainers/grpo.py, TPO's and FlowRL's)   ...[tpo]
    flowrl-stored-old-on-policy, flowrl-log-z-per-row   trainers/test_rl_distributed.py::...[flowrl]
(flowrl-log-z-per-row survived the test at group_size 2, so FlowRL's torchrun case uses groups of 4.)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the RL tests, fastest first, so that most mutants die within seconds
RL_TESTS = ["tests/rl", "tests/trainers/test_rlhf.py", "tests/trainers/test_dpo.py", "tests/trainers/test_ppo.py",
            "tests/trainers/test_grpo.py", "tests/trainers/test_reinforce.py", "tests/trainers/test_rl_progress.py",
            "tests/trainers/test_rl_distributed.py", "tests/trainers/test_grpo_options.py",
            "tests/trainers/test_tpo.py", "tests/trainers/test_flowrl.py"]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str      # relative to the repository root
    old: str       # exact text, must occur once
    new: str
    bug: str       # the behaviour it breaks


PPO, GRPO, LOSSES, ADV = "palm_rlhf/rl/ppo.py", "palm_rlhf/rl/grpo.py", "palm_rlhf/rl/losses.py", \
    "palm_rlhf/rl/advantages.py"
PPO_T, BASE_T, DPO_T, RLHF_T = "palm_rlhf/trainers/ppo.py", "palm_rlhf/trainers/rl_base.py", \
    "palm_rlhf/trainers/dpo.py", "palm_rlhf/trainers/rlhf.py"
REINFORCE, RPP_T, SCORER = "palm_rlhf/rl/reinforce.py", "palm_rlhf/trainers/reinforce_pp.py", \
    "palm_rlhf/generation/scoring.py"
FLOWRL, TPO = "palm_rlhf/rl/flowrl.py", "palm_rlhf/rl/tpo.py"
CONTROLLER_CALL = "self.kl_ctl.update(float(total[0] / total[1]), int(total[1]))"

MUTANTS = [
    # 1. the entropy bonus
    Mutant("ppo-entropy-sign", PPO, "- hp.ent_coef * entropy", "+ hp.ent_coef * entropy",
           "PPO's entropy bonus becomes a penalty"),
    Mutant("grpo-entropy-sign", GRPO, "- hp.ent_coef * entropy", "+ hp.ent_coef * entropy",
           "GRPO's entropy bonus becomes a penalty"),
    # 2. the value loss
    Mutant("ppo-drop-value-loss", PPO, "terms.loss + hp.vf_coef * vf - ", "terms.loss - ",
           "the critic's loss is left out of the PPO loss"),
    # 3. value targets
    Mutant("ppo-returns-from-whitened-advantages", PPO,
           "        advantages = whiten(advantages, mask, reduce_sum=reduce_sum)\n",
           "        advantages = whiten(advantages, mask, reduce_sum=reduce_sum)\n"
           "        returns = (advantages + rollout.values) * mask\n",
           "value targets built from whitened advantages"),
    # 4. reward whitening
    Mutant("whiten-rewards-removes-mean", PPO, "whiten(rewards, mask, shift_mean=False,",
           "whiten(rewards, mask, shift_mean=True,", "reward whitening removes the rewards' mean"),
    Mutant("whiten-rewards-ignored", PPO, "if hp.whiten_rewards:", "if False:", "whiten_rewards=True does nothing"),
    # 5. asymmetric clipping
    Mutant("grpo-ignores-clip-eps-high", GRPO, "hp.clip_eps, hp.clip_eps_high)", "hp.clip_eps)",
           "GRPO never passes clip_eps_high"),
    Mutant("clip-eps-high-ignored", LOSSES, "high = clip_eps if clip_eps_high is None else clip_eps_high",
           "high = clip_eps", "ppo_policy_terms clips symmetrically whatever clip_eps_high is"),
    # 6. the adaptive KL controller
    Mutant("kl-controller-every-other-step", PPO_T, f"        {CONTROLLER_CALL}",
           f"        if step % 2 == 0:\n            {CONTROLLER_CALL}", "the controller is not updated every step"),
    Mutant("kl-controller-n-local-rows", PPO_T, "int(total[1]))", "len(kl))",
           "n_steps = this rank's rollouts, not the step's"),
    Mutant("kl-controller-n-minibatch", PPO_T, "int(total[1]))", "self.config.batch_size)",
           "n_steps = the minibatch size"),
    Mutant("kl-controller-token-mean", PPO_T, "torch.tensor(float(len(kl)), device=kl.device)",
           "rollout.mask.sum().to(kl.dtype)", "the controller sees the KL per token, not per sequence"),
    Mutant("kl-controller-rank-local", PPO_T, "total = all_reduce_sum(torch.stack(",
           "total = (lambda t: t)(torch.stack(", "the controller sees this rank's KL only"),
    Mutant("kl-controller-stale-coef", PPO, "kl_shaped_rewards(rollout.scores, kl, mask, kl_coef)",
           "kl_shaped_rewards(rollout.scores, kl, mask, 0.05)", "rewards ignore the controller's coefficient"),
    # 7-8. DPO / IPO
    Mutant("dpo-mean-log-probs", DPO_T, "        total = logp.sum(-1)\n",
           "        total = logp.sum(-1) / packed.mask.sum(-1).clamp(min=1)\n",
           "DPO averages the response log-probs instead of summing them"),
    Mutant("ipo-abs", LOSSES, "loss = (h - 1.0 / (2.0 * beta)) ** 2", "loss = (h - 1.0 / (2.0 * beta)).abs()",
           "IPO takes |h - 1/(2 beta)| instead of its square"),
    # 9. best of n
    Mutant("best-of-n-worst", RLHF_T, "best = int(scores.argmax())", "best = int(scores.argmin())",
           "RLHFTrainer.generate returns the worst-scoring sample"),
    # 10. distributed
    Mutant("same-noise-every-rank", BASE_T, "first = self.env.rank * len(rows)", "first = 0",
           "every rank draws the sampling noise of rank 0's rows"),
    Mutant("same-noise-every-row", BASE_T, "manual_seed((base + r + (1 << 40)) % (2 ** 63))",
           "manual_seed((base + (1 << 40)) % (2 ** 63))", "every row of a step draws the same noise"),
    Mutant("loss-weight-one-per-rank", BASE_T, "        return float(mb.mask.sum())\n", "        return 1.0\n",
           "each rank's PPO loss weighs 1, not its token count"),
    # logged rollout metrics (the weak assertions of issue 17)
    Mutant("eos-rate-inverted", BASE_T, 'eos = torch.tensor([r == "eos"', 'eos = torch.tensor([r != "eos"',
           "eos_rate counts the rows that did not end in EOS"),
    Mutant("response-length-without-eos", BASE_T, "lengths.sum().cpu(), eos.sum()",
           "(lengths.sum() - eos.sum()).cpu(), eos.sum()", "response_length leaves the EOS token out"),
    Mutant("kl-ref-token-mean", BASE_T, '"kl_ref": kl / n,', '"kl_ref": kl / max(ln, 1.0),',
           "the logged KL is a token mean, not per sequence"),
    # classics the older tests already pinned (a sanity check of this script)
    Mutant("kl-direction-flipped", "palm_rlhf/rl/kl.py", "diff = logp - ref_logp", "diff = ref_logp - logp",
           "KL(ref || policy) instead of KL(policy || ref)"),
    Mutant("ppo-min-instead-of-max", LOSSES, "loss = torch.maximum(unclipped, clipped)",
           "loss = torch.minimum(unclipped, clipped)", "the optimistic, not the pessimistic, PPO bound"),
    # the one scorer (issue 31): what every loss reads
    Mutant("scorer-temperature-ignored", SCORER, "finetune_scope=self.scope, temperature=self.temperature,",
           "finetune_scope=self.scope,", "the policy's log-probs ignore the sampling temperature"),
    Mutant("scorer-reference-is-the-policy", SCORER, "finetune_scope=ref.scope, disable_lora=ref.disable_lora,",
           "finetune_scope=self.scope, disable_lora=False,",
           "the reference is scored through the trained adapter (the KL to the policy itself)"),
    # RLOO and REINFORCE++ (issue 31)
    Mutant("rloo-baseline-includes-self", REINFORCE,
           "others = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)",
           "others = groups.mean(-1, keepdim=True)", "RLOO's baseline includes the sample itself"),
    Mutant("rloo-kl-ignored", REINFORCE, "rewards = rollout.scores.float() - hp.kl_coef * kl.sum(-1)",
           "rewards = rollout.scores.float()", "RLOO's reward leaves out the KL to the reference"),
    Mutant("reinforce-pp-baseline-ignored", REINFORCE, "    if group_size is not None:\n        scores = group_mean",
           "    if False:\n        scores = group_mean", "REINFORCE++-baseline never subtracts the group mean"),
    Mutant("reinforce-pp-gamma-ignored", REINFORCE, "running = (rewards[:, t] + gamma * running)",
           "running = (rewards[:, t] + running)", "REINFORCE++'s returns ignore the discount"),
    Mutant("reinforce-pp-not-whitened", REINFORCE, "return whiten(returns, mask, reduce_sum=reduce_sum), returns",
           "return returns, returns", "REINFORCE++'s advantages are the raw returns"),
    Mutant("reinforce-pp-whiten-rank-local", RPP_T, "reinforce_prepare(rollout, self.hp, all_reduce_sum)",
           "reinforce_prepare(rollout, self.hp)", "each rank whitens REINFORCE++'s advantages over its own tokens"),
    Mutant("reinforce-entropy-sign", REINFORCE, "- hp.ent_coef * entropy", "+ hp.ent_coef * entropy",
           "RLOO's and REINFORCE++'s entropy bonus becomes a penalty"),
    # the seed package's methods (issue 34)
    Mutant("spo-penalty-sign", LOSSES, "-adv * ratio + adv.abs() / (2.0 * eps)", "-adv * ratio - adv.abs() / (2.0 * eps)",
           "SPO's quadratic penalty rewards leaving the trust region"),
    Mutant("spo-penalty-signed-advantage", LOSSES, "-adv * ratio + adv.abs() / (2.0 * eps)",
           "-adv * ratio + adv / (2.0 * eps)", "SPO's penalty uses A instead of |A| (a negative A flips it)"),
    Mutant("maxrl-divides-by-std", ADV, "centered = centered / mean.abs().clamp(min=eps)",
           "centered = centered / groups.std(-1, keepdim=True)", "advantage_norm=mean divides by the std"),
    Mutant("dr-grpo-constant-ignored", ADV, "centered = centered / constant", "centered = centered",
           "advantage_norm=constant ignores its constant"),
    Mutant("entropy-bonus-uncapped", ADV, "torch.minimum(scale * entropy.detach(), advantages.abs() / kappa)",
           "scale * entropy.detach()", "the entropy bonus is not capped at |A| / kappa"),
    Mutant("entropy-bonus-with-gradient", ADV, "scale * entropy.detach()", "scale * entropy",
           "the entropy added to the advantage carries a gradient"),
    Mutant("score-centering-not-centred", LOSSES, "centred = weighted - (coef.detach() * head_logp).sum(-1)",
           "centred = weighted", "the score-centring term is dropped (plain REINFORCE)"),
    Mutant("score-centering-tail-ignored", LOSSES, "coef = coef - (w(rho) / rho)[..., None] * head_p",
           "coef = coef", "top-k score centring forgets the tail event"),
    Mutant("score-centering-weight-ignored", LOSSES, "weighted = w(ratio_a) * logp_a", "weighted = logp_a",
           "the importance weight is not applied to the sampled token"),
    Mutant("flowrl-no-length-norm", FLOWRL, "mean_logp = (logp * m).sum(-1) / length",
           "mean_logp = (logp * m).sum(-1)", "FlowRL's policy log-prob is not divided by |y|"),
    Mutant("flowrl-weight-unclipped", FLOWRL, "weight = log_ratio.exp().clamp(1.0 - clip_eps, 1.0 + clip_eps)",
           "weight = log_ratio.exp()", "FlowRL's importance weight is not clipped"),
    Mutant("flowrl-reward-sign", FLOWRL, "- beta * rewards.detach()", "+ beta * rewards.detach()",
           "FlowRL's target favours low rewards"),
    Mutant("tpo-target-ignores-old-policy", TPO, "F.softmax(old + z / eta, -1)", "F.softmax(z / eta, -1)",
           "TPO's target forgets the sampler's log-probs"),
    Mutant("tpo-eta-multiplies", TPO, "F.softmax(old + z / eta, -1)", "F.softmax(old + z * eta, -1)",
           "TPO's temperature multiplies the rewards"),
    Mutant("tpo-trains-flat-groups", TPO, "return torch.where(has_variance, loss, torch.zeros_like(loss))",
           "return loss", "groups without reward variance still move the policy"),
    Mutant("grpo-spo-ignored", GRPO, 'if hp.policy_loss == "spo":', "if False:",
           "GRPO's policy_loss=spo runs the clip"),
    Mutant("grpo-entropy-advantage-ignored", GRPO, "if hp.entropy_scale > 0:", "if False:",
           "GRPO's entropy_advantage does nothing"),
    Mutant("grpo-advantage-norm-ignored", GRPO, "hp.group_size, hp.advantage_norm,", 'hp.group_size, "std",',
           "GRPO's advantage_norm does nothing"),
    Mutant("tpo-rows-shuffled", "palm_rlhf/trainers/grpo.py",
           "return (groups[:, None] * g + torch.arange(g)[None, :]).reshape(-1)",
           "return torch.randperm(n, generator=generator)", "TPO's (and FlowRL's) minibatches split groups"),
    Mutant("flowrl-stored-old-on-policy", "palm_rlhf/trainers/flowrl.py",
           "old_logp = logp.detach() if on_policy else mb.old_log_probs", "old_logp = mb.old_log_probs",
           "FlowRL's on-policy weight from the stored sampler log-probs (Adam amplifies their rounding in log Z)"),
    Mutant("flowrl-log-z-per-row", "palm_rlhf/trainers/flowrl.py",
           "log_z = self.log_z(mb.prompt_embeddings[::g])[:, None].expand(-1, g).reshape(-1)",
           "log_z = self.log_z(mb.prompt_embeddings)",
           "FlowRL's log Z per row: its first gradient sums rounding across groups"),
    Mutant("flowrl-log-z-not-trained", "palm_rlhf/trainers/flowrl.py",
           "return super()._parameters() + list(self.log_z.parameters())", "return super()._parameters()",
           "FlowRL's log Z is never optimised"),
    Mutant("tpo-entropy-sign", TPO, "loss = ce - ent_coef *", "loss = ce + ent_coef *",
           "TPO's entropy bonus becomes a penalty"),
]

# name -> why it is not a real bug (mutants expected to survive; none at the last run)
SURVIVORS: dict[str, str] = {}


def run_tests(workdir: Path, extra: list[str]) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(workdir), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *extra, *RL_TESTS],
                          cwd=workdir, env=env, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def first_failure(output: str) -> str:
    m = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    return m.group(1) if m else "(no failing test named; see the output)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. '-m \"not slow\"'")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:40s} {m.path:32s} {m.bug}")
        return 0
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutant(s) {sorted(unknown)}; see --list")
    extra = args.pytest_args.split() if args.pytest_args else []
    with tempfile.TemporaryDirectory(prefix="palm-rlhf-mutants-") as tmp:
        work = Path(tmp)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for name in ("palm_rlhf", "tests"):
            shutil.copytree(ROOT / name, work / name, ignore=ignore)
        shutil.copy2(ROOT / "pyproject.toml", work / "pyproject.toml")
        probe = subprocess.run([sys.executable, "-c", "import palm_rlhf; print(palm_rlhf.__file__)"], cwd=work,
                               env={**os.environ, "PYTHONPATH": str(work)}, capture_output=True, text=True)
        if not probe.stdout.strip().startswith(str(work)):
            print(f"the copy is not what gets imported ({probe.stdout.strip()}); aborting", file=sys.stderr)
            return 2
        rc, out, secs = run_tests(work, extra)
        if rc != 0:
            print(f"the RL tests fail without any mutant ({first_failure(out)}); fix that first\n{out[-3000:]}")
            return 2
        print(f"unmutated: RL tests pass ({secs:.0f} s)")
        results = {}
        for m in chosen:
            target = work / m.path
            original = target.read_text()
            if original.count(m.old) != 1:
                results[m.name] = "NOT APPLIED"
                print(f"{m.name:40s} NOT APPLIED: {m.old!r} occurs {original.count(m.old)} times in {m.path}")
                continue
            target.write_text(original.replace(m.old, m.new))
            try:
                rc, out, secs = run_tests(work, extra)
            finally:
                target.write_text(original)
            if rc == 0:
                results[m.name] = "SURVIVED"
                why = SURVIVORS.get(m.name, "NOT EXPLAINED: add a test, or a reason in SURVIVORS")
                print(f"{m.name:40s} SURVIVED ({secs:.0f} s): {why}")
            else:
                results[m.name] = "KILLED"
                print(f"{m.name:40s} killed by {first_failure(out)} ({secs:.0f} s)")
    bad = [n for n, r in results.items() if r == "NOT APPLIED" or (r == "SURVIVED" and n not in SURVIVORS)]
    print(f"{sum(r == 'KILLED' for r in results.values())}/{len(results)} killed; "
          f"survived: {[n for n, r in results.items() if r == 'SURVIVED'] or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
