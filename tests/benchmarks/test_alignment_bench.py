"""benchmarks/alignment.py's bookkeeping: the rules' units and the fit of DPO's margins on them."""

import pytest
import torch

from palm_rlhf.data.preferences import PairwiseRecord
from tests.helpers.scripts import BENCHMARKS, load_script

alignment = load_script(BENCHMARKS / "alignment.py")


def test_good_units_by_hand():
    assert alignment.good_units("word", "the cat Sat on mats.") == (2, 5)  # the, cat
    assert alignment.good_units("format", "f(x)\ng(y  \n") == (2, 3)  # "g(y  " unbalanced, trailing spaces
    assert alignment.rule_score("vowel", "abcde") == pytest.approx(2 / 5)


def test_unit_fit_recovers_a_per_unit_margin():
    """Margins that are exactly 1.5 per good word minus 0.25 per bad word: the fit finds both, explains
    all the variance and orders every pair as the margins do."""
    texts = ["alpha beta gamma", "alpha Beta gamma", "one two", "x y z w", "delta epsilon 7"]
    pairs = [(a, b) for a in texts for b in texts if a != b]
    records = [PairwiseRecord(prompt="", chosen=a, rejected=b) for a, b in pairs]

    def value(text):
        good, n = alignment.good_units("word", text)
        return 1.5 * good - 0.25 * (n - good)
    margins = torch.tensor([value(a) - value(b) for a, b in pairs])
    fit = alignment.unit_fit("word", records, margins)
    assert fit["per_good"] == pytest.approx(1.5) and fit["per_bad"] == pytest.approx(-0.25)
    assert fit["r2"] == pytest.approx(1.0) and fit["residual_sd"] == pytest.approx(0.0, abs=1e-9)
    assert fit["fit_accuracy"] == pytest.approx(float((margins > 0).double().mean()))

    noisy = margins + torch.tensor([(-1.0) ** i for i in range(len(pairs))])
    assert alignment.unit_fit("word", records, noisy)["r2"] < 1.0


def test_label_puts_the_rules_choice_first_and_drops_ties():
    prompts = ["p1", "p2", "p3"]
    first = ["the cat sat", "x = 1", "one two"]
    second = ["X.y z", "the end", "two one"]  # the last pair ties (both all good)
    records = alignment.label("word", prompts, first, second)
    assert [(r.prompt, r.chosen, r.rejected) for r in records] == [("p1", "the cat sat", "X.y z"),
                                                                   ("p2", "the end", "x = 1")]
    assert all(r.annotator == "rule:word" for r in records)


def test_more_table_reports_accuracies_with_their_standard_errors():
    result = {"rule": "word", "seed": 1, "rm_accuracy": 0.95,
              "dpo": {"heldout_accuracy": 0.85, "train_accuracy": 0.92},
              "more": {"held_more": {"n": 1600, "rm_accuracy": 0.975, "dpo_accuracy": 0.8},
                       "train_new": {"n": 400, "rm_accuracy": 0.9, "dpo_accuracy": 0.75}}}
    row = alignment.more_table([result])[-1]
    # sqrt(p (1 - p) / n): 0.975 of 1,600 -> 0.0039, 0.8 of 1,600 -> 0.010, 0.75 of 400 -> 0.0217
    assert row == ("| word | 1 | 0.950 | 0.975 ± 0.004 (1600) | 0.850 | 0.800 ± 0.010 | 0.920 | "
                   "0.750 ± 0.022 (400) |")
    assert alignment.more_table([{**result, "more": {}}]) == []  # results cached before these pairs existed


def test_residual_agreement_between_seeds():
    def run(seed, residuals, rule="word"):
        return {"rule": rule, "seed": seed, "dpo": {"unit_fit": {"residuals": residuals}}}
    same, flipped = [1.0, -2.0, 0.5, 3.0], [-1.0, 2.0, -0.5, -3.0]
    lines = alignment.residual_agreement([run(0, same), run(1, same), run(2, flipped), run(0, same, "format")])
    assert lines[-1] == "- word: seeds 0-1 1.00, seeds 0-2 -1.00, seeds 1-2 -1.00"  # format: one seed, no line
    assert alignment.residual_agreement([{"rule": "word", "seed": 0, "dpo": {}}]) == []


def _summed_log_ratio(policy, reference, prompt, response, scope=None):
    """log p(response | prompt) under `policy` minus under `reference`, from one plain forward each."""
    ids = torch.tensor([prompt + response])
    start = len(prompt) - 1  # the logit that predicts the response's first token
    with torch.no_grad():
        pol = policy(ids, finetune_scope=scope).log_softmax(-1)[0, start:-1]
        ref = reference(ids, disable_lora=scope is not None).log_softmax(-1)[0, start:-1]
    target = torch.tensor(response)[:, None]
    return float((pol.gather(1, target) - ref.gather(1, target)).sum())


def test_dpo_margins_of_a_lora_run_and_of_a_full_finetune_run(tmp_path):
    """`load_policy` reads a LoRA run as the base with its actor scope (reference: LoRA off) and a
    `use_lora=false` run as its own model against the base; either way `dpo_margins` is the summed
    log-ratio of chosen + EOS minus that of rejected + EOS."""
    from palm_rlhf.data.tokenizer import ByteTokenizer
    from palm_rlhf.model import PaLM
    from palm_rlhf.model.checkpoint import save_adapter
    from palm_rlhf.trainers.dpo import encode_pair

    torch.manual_seed(0)
    base = PaLM(dim=16, num_tokens=259, depth=1, dim_head=8, heads=2).eval()
    tuned = PaLM(dim=16, num_tokens=259, depth=1, dim_head=8, heads=2).eval()  # other weights: a finetuned model
    tuned.save_pretrained(tmp_path / "full" / "final")
    base.add_finetune_params("actor", lora_r=2)
    for weight in base.finetune_modules["actor"].parameters():
        torch.nn.init.normal_(weight, std=0.5)  # B too: a trained adapter
    save_adapter(base, "actor", tmp_path / "lora" / "final" / "adapter.safetensors")
    base.remove_finetune_params("actor")

    tok = ByteTokenizer()
    records = [PairwiseRecord("def f(x):", " return x", " pass"), PairwiseRecord("a = ", "[1, 2]", "((")]
    assert not alignment.finished(tmp_path / "neither")
    for run in ("lora", "full"):
        assert alignment.finished(tmp_path / run)
        policy = alignment.load_policy(base, tmp_path / run)
        model, reference = (base, base) if run == "lora" else (policy.model, base)
        assert (policy.scope, policy.reference) == (("actor", None) if run == "lora" else (None, base))
        expected = []
        for r in records:
            (prompt, chosen), (_, rejected) = encode_pair(r, tok, 256)
            expected.append(_summed_log_ratio(model, reference, prompt, chosen, policy.scope)
                            - _summed_log_ratio(model, reference, prompt, rejected, policy.scope))
        margins = alignment.dpo_margins(policy, tok, records)
        assert margins.tolist() == pytest.approx(expected, abs=1e-4)
        assert margins.abs().min() > 1e-3  # a policy that differs from its reference
        if policy.scope:
            base.remove_finetune_params(policy.scope)


def test_llama_base_is_a_family_checkpoint_with_the_presets_sizes(tmp_path):
    """--family llama: transformers writes a Llama with tiny-stdlib's width, depth and heads (half the KV
    heads); our decoder loads it as a sequential-block family model whose logits are transformers'."""
    import transformers

    from palm_rlhf.model import PaLM

    path = alignment.llama_checkpoint(tmp_path / "llama", "tiny-stdlib")
    ours = PaLM.from_pretrained(path).eval()
    theirs = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    assert (ours.block, ours.dim, ours.kv_heads, ours.num_tokens) == ("sequential", 64, 2, 256)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours.logits(ids), theirs(ids).logits, atol=1e-4)


def test_report_lists_each_preset_variant_beside_its_preset(tmp_path):
    """`--algos grpo,grpo@policy_loss=spo`: the variant is a row of its own, named by its keys."""
    row = {"kl": 1.0, "kl_se": 0.1, "rule_gain": 0.05, "rule_gain_se": 0.02, "rm_gain": 2.0, "rm_gain_se": 1.0}
    result = {"rule": "vowel", "seed": 0, "rm_accuracy": 0.7, "rm_curve": [], "grpo": row,
              "grpo@policy_loss=spo": {**row, "rule_gain": 0.1}}
    table = alignment.report([result], tmp_path).splitlines()
    assert table[2].startswith("| vowel | 0 | 0.700 | grpo | +0.050 (+2.5) |")
    assert table[3].startswith("| vowel | 0 | 0.700 | grpo@policy_loss=spo | +0.100 (+5.0) |")
