"""pooling='sequence_classification': TRL's reward head (transformers' *ForSequenceClassification), a
linear head on the last real token's final hidden state, the model seeing token ids only; on PaLM and
on a Llama-family base, padded on either side, saved and reloaded, and trained by `reward train`."""

from __future__ import annotations

import pytest
import torch

from palm_rlhf import PaLM
from palm_rlhf.data.preferences import write_preferences
from palm_rlhf.data.synthetic import rule_preference_pairs
from palm_rlhf.model.reward import POOLINGS, RewardModel
from palm_rlhf.runtime.config import load_config
from palm_rlhf.trainers.grpo import GRPOConfig
from palm_rlhf.trainers.reward import RewardTrainConfig, RewardTrainer
from palm_rlhf.trainers.reward_score import score_records
from palm_rlhf.trainers.rl_setup import load_reward
from tests.helpers.families import make_hf_checkpoint

SEQ = "sequence_classification"
PALM_CFG = dict(num_tokens=64, dim=32, depth=2, heads=2, dim_head=16)


class Bytes:
    def encode(self, s):
        return list(s.encode())


def _randomize_head(rm, seed=0):
    """A non-trivial head and segment embeddings (which sequence_classification must not read)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (*rm.to_pred.parameters(), rm.prompt_embed, rm.response_embed):
            p.copy_(torch.randn(p.shape, generator=g))
    return rm


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    make_hf_checkpoint("llama", directory, vocab=384)  # pad_token_id 0
    return directory


def _base(kind, llama_dir):
    if kind == "palm":
        torch.manual_seed(0)
        palm = PaLM(**PALM_CFG)
        with torch.no_grad():  # non-trivial gains
            for name, p in palm.named_parameters():
                if name.endswith("gamma") or name.endswith("weight") and p.ndim == 1:
                    p.copy_(1 + 0.3 * torch.randn_like(p))
        return palm
    return PaLM.from_pretrained(llama_dir)


def _rows(vocab):
    """Three (prompt, response) rows of different lengths, ids >= 1 (0 is the pad id)."""
    g = torch.Generator().manual_seed(3)
    lengths = [(3, 4), (1, 2), (5, 1)]
    return ([torch.randint(1, vocab, (p,), generator=g) for p, _ in lengths],
            [torch.randint(1, vocab, (r,), generator=g) for _, r in lengths])


def _padded(prompts, responses, side):
    """x (b, n), mask (b, n), prompt_lengths (b,) with the padding on `side`."""
    rows = [torch.cat([p, r]) for p, r in zip(prompts, responses)]
    n = max(len(r) for r in rows)
    x = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, row in enumerate(rows):
        cols = slice(0, len(row)) if side == "right" else slice(n - len(row), n)
        x[i, cols], mask[i, cols] = row, True
    return x, mask, torch.tensor([len(p) for p in prompts])


@pytest.mark.parametrize("kind", ["palm", "llama"])
def test_score_is_the_head_on_the_last_real_tokens_hidden_state_whatever_the_padding(kind, llama_dir):
    """By hand: each row alone through the decoder, its last position's final hidden state times the
    head's weight. Right padding, left padding and `score()` all give that number; the segment
    embeddings (random here) are not read, while pooling='last' reads them (and equals it when
    they are zero, as built)."""
    palm = _base(kind, llama_dir)
    rm = _randomize_head(RewardModel(palm, dropout=0.0, use_lora=False, pooling=SEQ)).eval()
    prompts, responses = _rows(palm.num_tokens)
    w = rm.to_pred[0].weight[0]
    with torch.no_grad():
        by_hand = torch.stack([palm.hidden_states(torch.cat([p, r])[None])[0, -1] @ w
                               for p, r in zip(prompts, responses)])
        for side in ("right", "left"):
            x, mask, plens = _padded(prompts, responses, side)
            torch.testing.assert_close(rm(x, mask=mask, prompt_lengths=plens), by_hand, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rm.score(prompts, responses), by_hand, atol=1e-5, rtol=1e-5)
        last = _randomize_head(RewardModel(palm, dropout=0.0, use_lora=False, pooling="last")).eval()
        last.to_pred[0].weight.copy_(rm.to_pred[0].weight)
        assert (last.score(prompts, responses) - by_hand).abs().min() > 1e-3
        last.prompt_embed.zero_(), last.response_embed.zero_()  # as built: then 'last' is the same head
        torch.testing.assert_close(last.score(prompts, responses), by_hand, atol=1e-5, rtol=1e-5)


def test_equals_transformers_llama_for_sequence_classification(llama_dir):
    """Ours on the Llama checkpoint == transformers' LlamaForSequenceClassification (what TRL's
    RewardTrainer trains) with the same score weight, on left- and right-padded batches."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.LlamaForSequenceClassification.from_pretrained(llama_dir, num_labels=1).eval()
    rm = _randomize_head(RewardModel(PaLM.from_pretrained(llama_dir), dropout=0.0, use_lora=False,
                                     pooling=SEQ)).eval()
    with torch.no_grad():
        ref.score.weight.copy_(rm.to_pred[0].weight)
        prompts, responses = _rows(384)
        for side in ("right", "left"):
            x, mask, plens = _padded(prompts, responses, side)
            theirs = ref(input_ids=x, attention_mask=mask.long()).logits[:, 0]
            torch.testing.assert_close(rm(x, mask=mask, prompt_lengths=plens), theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_left_padding_scores_what_right_padding_scores(pooling):
    """Every pooling: leading padding is moved out of the way, so a row's score does not depend on
    the side it is padded on (before, a left-padded row's real tokens attended to its padding)."""
    torch.manual_seed(0)
    rm = _randomize_head(RewardModel(_base("palm", None), dropout=0.0, pooling=pooling)).eval()
    prompts, responses = _rows(64)
    with torch.no_grad():
        x, mask, plens = _padded(prompts, responses, "right")
        right = rm(x, mask=mask, prompt_lengths=plens)
        x, mask, plens = _padded(prompts, responses, "left")
        torch.testing.assert_close(rm(x, mask=mask, prompt_lengths=plens), right, atol=1e-5, rtol=1e-5)
        prompt_mask = torch.arange(x.shape[1])[None] < (x.shape[1] - mask.sum(1) + plens)[:, None]
        torch.testing.assert_close(rm(x, mask=mask, prompt_mask=prompt_mask & mask), right, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["palm", "llama"])
def test_save_and_reload_score_identically_here_and_where_rl_loads_a_reward_model(kind, llama_dir, tmp_path):
    """save_pretrained -> from_pretrained keeps the pooling and gives bit-identical scores; so does the
    loader behind PPO/GRPO `reward_model=` (rl_setup.load_reward)."""
    palm = _base(kind, llama_dir)
    rm = _randomize_head(RewardModel(palm, dropout=0.0, lora_r=4, pooling=SEQ)).eval()
    with torch.no_grad():  # a trained-looking LoRA scope
        for name, p in rm.palm.named_parameters():
            if "finetune" in name or "lora" in name:
                p.add_(0.1 * torch.randn_like(p))
    prompts, responses = _rows(palm.num_tokens)
    expected = rm.score(prompts, responses)
    rm.save_pretrained(tmp_path / "rm")
    loaded = RewardModel.from_pretrained(tmp_path / "rm")
    assert loaded.pooling == SEQ
    assert torch.equal(loaded.score(prompts, responses), expected)
    config = load_config(GRPOConfig, None, [f"reward_model={tmp_path / 'rm'}"])
    source = load_reward(None, config, None)
    assert torch.equal(source(prompts, responses), expected.float())
    trainable = {id(p) for p in rm.finetune_parameters()}
    assert id(rm.prompt_embed) not in trainable and id(rm.response_embed) not in trainable


def test_reward_train_on_a_llama_base_saves_the_head_with_final(llama_dir, tmp_path):
    """`reward train pooling=sequence_classification` on a family checkpoint: the segment embeddings
    stay untouched (frozen, unused), final/ reloads with the same pooling and scores what the
    trained model scores."""
    write_preferences(tmp_path / "p.jsonl", rule_preference_pairs(24, seed=0))
    config = load_config(RewardTrainConfig, None, [f"model={llama_dir}", f"data={tmp_path / 'p.jsonl'}",
                                                   f"out_dir={tmp_path / 'run'}", f"pooling={SEQ}", "max_steps=3",
                                                   "batch_size=4", "eval.fraction=0.25", "progress=false"])
    trainer = RewardTrainer(config, tokenizer=Bytes()).setup()
    try:
        head_before = trainer.model.to_pred[0].weight.detach().clone()
        trainer.train()
    finally:
        trainer.cleanup()
    model = trainer.model.eval()
    assert not torch.equal(model.to_pred[0].weight, head_before)  # the head trained
    assert not model.prompt_embed.any() and not model.response_embed.any()  # zeros as built: not trained
    final = RewardModel.from_pretrained(tmp_path / "run" / "final")
    assert final.pooling == SEQ
    pairs = rule_preference_pairs(6, seed=5)
    for a, b in zip(score_records(final, Bytes(), pairs), score_records(model, Bytes(), pairs)):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_learns_a_known_preference_rule_with_the_last_token_head(tmp_path):
    """The bar of test_reward_trainer's rule test (same data, LoRA and schedule): >= 95% held-out.

    The base has 2 layers, not 1: without the prompt/response embeddings the last position must
    itself find where the response starts and average its vowels, and one layer did not get there
    (93.0% held-out at depth 1; 96.0% at depth 2, the figure in docs/reward.md)."""
    torch.manual_seed(0)
    base = str(PaLM(num_tokens=256, dim=32, depth=2, heads=2, dim_head=16).save_pretrained(tmp_path / "base"))
    write_preferences(tmp_path / "train.jsonl", rule_preference_pairs(512, seed=1))
    held_out = rule_preference_pairs(200, seed=2)
    write_preferences(tmp_path / "val.jsonl", held_out)
    config = load_config(RewardTrainConfig, None, [f"model={base}", f"data={tmp_path / 'train.jsonl'}",
                                                   f"out_dir={tmp_path / 'run'}", f"pooling={SEQ}", "max_steps=150",
                                                   "batch_size=16", "optim.lr=3e-3",
                                                   f"eval.data={tmp_path / 'val.jsonl'}", "eval.every=150",
                                                   "progress=false"])
    trainer = RewardTrainer(config, tokenizer=Bytes()).setup()
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    rc, rr = score_records(RewardModel.from_pretrained(tmp_path / "run" / "final"), Bytes(), held_out)
    accuracy = (rc > rr).float().mean().item()
    assert accuracy >= 0.95, accuracy
