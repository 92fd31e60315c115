"""`palm-rlhf export` on a reward model, through the CLI as a user runs it: `reward train
pooling=sequence_classification` on a tiny Llama (LoRA, its tokenizer without a pad token) and a tiny
Qwen2 (full finetune, tied embeddings), then `export`: transformers'
AutoModelForSequenceClassification loads OUT with no missing or unexpected keys and scores left- and
right-padded batches as our reward model does; the tokenizer came along. What has no transformers
class (another pooling, a rating-bin head, a PaLM base) and --adapter-only are refused in one line.
"""

from __future__ import annotations

import json

import pytest
import torch

from palm_rlhf import PaLM, load_model
from palm_rlhf.data.preferences import write_preferences
from palm_rlhf.data.synthetic import rule_preference_pairs
from palm_rlhf.model.reward import RewardModel
from tests.helpers.families import make_hf_checkpoint
from tests.helpers.processes import palm_rlhf_cli as cli
from tests.helpers.hf_tokenizers import chatml, llama3

transformers = pytest.importorskip("transformers")
SEQ = "sequence_classification"
VOCAB = 400


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{family: checkpoint directory}: a Llama whose config and tokenizer name no pad token (export falls
    back to the tokenizer's EOS), and a Qwen2 whose config names pad_token_id 0."""
    llama = tmp_path_factory.mktemp("llama")
    llama3(llama)
    make_hf_checkpoint("llama", llama, vocab=VOCAB, bos_token_id=0, eos_token_id=[1, 4], pad_token_id=None)
    qwen2 = tmp_path_factory.mktemp("qwen2")
    chatml(qwen2)
    make_hf_checkpoint("qwen2", qwen2, vocab=VOCAB, seed=1)
    return {"llama": llama, "qwen2": qwen2}


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefs") / "p.jsonl"
    write_preferences(path, rule_preference_pairs(16, seed=0))
    return path


def _batch(pad: int, side: str):
    """Token rows of lengths 7, 3 and 5 (ids 5.. so none is the pad id), padded with `pad` on `side`."""
    g = torch.Generator().manual_seed(7)
    rows = [torch.randint(5, VOCAB, (n,), generator=g) for n in (7, 3, 5)]
    x = torch.full((len(rows), 7), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), 7, dtype=torch.bool)
    for i, row in enumerate(rows):
        cols = slice(0, len(row)) if side == "right" else slice(7 - len(row), 7)
        x[i, cols], mask[i, cols] = row, True
    return x, mask


@pytest.mark.parametrize("family,lora", [("llama", "lora.r=4"), ("qwen2", "lora.r=0")])
def test_reward_train_then_export_scores_the_same_in_transformers(family, lora, bases, prefs, tmp_path):
    base, run, out = bases[family], tmp_path / "rm", tmp_path / "hf"
    cli("reward", "train", f"model={base}", f"data={prefs}", f"out_dir={run}", f"pooling={SEQ}", lora,
        "max_steps=3", "batch_size=4", "optim.lr=0.01", "optim.warmup=0", "eval.fraction=0", "--no-progress")
    printed = cli("export", run, out).stdout
    arch = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification"}[family]
    assert arch in printed

    config = json.loads((out / "config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(out)  # the tokenizer came along
    assert tok("Hello there")["input_ids"] == transformers.AutoTokenizer.from_pretrained(base)("Hello there")[
        "input_ids"]
    # llama: neither config nor tokenizer names a pad token: the tokenizer's EOS; qwen2: the config's 0
    assert config["pad_token_id"] == (tok.eos_token_id if family == "llama" else 0)
    assert config["architectures"] == [arch]
    theirs, info = transformers.AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(theirs).__name__ == arch and theirs.config.num_labels == 1
    theirs.eval()

    ours = load_model(run)
    assert isinstance(ours, RewardModel) and ours.pooling == SEQ
    assert (ours.reward_lora_scope is not None) == (lora == "lora.r=4")
    with torch.no_grad():
        torch.testing.assert_close(theirs.score.weight, ours.to_pred[0].weight)
        start = transformers.AutoModelForCausalLM.from_pretrained(base).model.layers[0].self_attn.q_proj.weight
        assert (theirs.model.layers[0].self_attn.q_proj.weight - start).abs().max() > 1e-5  # LoRA merged / trained
        expected = None
        for side in ("right", "left"):
            x, mask = _batch(config["pad_token_id"], side)
            score = ours(x, mask=mask)
            expected = score if expected is None else expected
            torch.testing.assert_close(score, expected, atol=1e-5, rtol=1e-5)  # ours: either side
            torch.testing.assert_close(theirs(input_ids=x, attention_mask=mask.long()).logits[:, 0], score,
                                       atol=1e-4, rtol=1e-4)
        assert expected.std() > 1e-4  # different rows, different scores: the comparison has teeth


def _one_line_refusal(args, *needles):
    out = cli("export", *args, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    for needle in needles:
        assert needle in lines[0]


def test_what_has_no_transformers_class_is_refused_in_one_line(bases, tmp_path):
    llama = PaLM.from_pretrained(bases["llama"])
    RewardModel(llama, use_lora=False, pooling="last").save_pretrained(tmp_path / "last")
    _one_line_refusal([tmp_path / "last", tmp_path / "o1"], "pooling=last", f"pooling={SEQ}")
    RewardModel(llama, num_binned_output=5, pooling=SEQ).save_pretrained(tmp_path / "bins")
    _one_line_refusal([tmp_path / "bins", tmp_path / "o2"], "rating-bin head", f"pooling={SEQ}")
    palm = PaLM(dim=16, num_tokens=256, depth=1, heads=2, dim_head=8)
    RewardModel(palm, pooling=SEQ).save_pretrained(tmp_path / "palm")
    _one_line_refusal([tmp_path / "palm", tmp_path / "o3"], "PaLM base", "no transformers class")
    RewardModel(llama, lora_r=4, pooling=SEQ).save_pretrained(tmp_path / "lora")
    _one_line_refusal([tmp_path / "lora", tmp_path / "o4", "--adapter-only"], "--adapter-only",
                      "drop --adapter-only")
    assert not any((tmp_path / f"o{i}").exists() and any((tmp_path / f"o{i}").iterdir()) for i in range(1, 5))
