"""DPO trainer: raises held-out preference accuracy on rule-labelled pairs."""

import pytest
import torch

from palm_rlhf.data.synthetic import rule_preference_pairs
from palm_rlhf.data.tokenizer import ByteTokenizer
from palm_rlhf.errors import ConfigError
from palm_rlhf.trainers.dpo import DPOConfig, DPOTrainer, encode_pair
from palm_rlhf.model.palm import PaLM
from palm_rlhf.generation.scoring import pack_sequences, response_log_probs
from rl_fixtures import pretrained_tiny_state, tiny_model  # noqa: F401


def test_config_and_encoding():
    with pytest.raises(ConfigError, match="loss_type"):
        DPOConfig(loss_type="hinge")
    record = rule_preference_pairs(1, seed=3)[0]
    (p1, c), (p2, r) = encode_pair(record, ByteTokenizer(), max_len=64)
    assert c[-1] == 0 and r[-1] == 0  # EOS closes each response
    assert ByteTokenizer().decode(c[:-1]) == record.chosen and ByteTokenizer().decode(p1) == record.prompt
    (p1, c), (p2, r) = encode_pair(record, ByteTokenizer(), max_len=8)  # too long: cut to fit
    assert len(p1) + len(c) <= 8 and len(p2) + len(r) <= 8 and len(p1) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_raises_heldout_preference_accuracy(tmp_path, tiny_model, loss_type):
    """Pairs prefer the response with more vowels. Before training the implicit reward is 0 for every
    pair (accuracy 0: no pair is ranked); after 60 steps of 16 pairs, held-out implicit-reward accuracy
    is >= 0.75 and the policy's own preference accuracy rises by >= 0.15."""
    train = rule_preference_pairs(400, seed=0)
    heldout = rule_preference_pairs(64, seed=1)
    config = DPOConfig(out_dir=str(tmp_path / loss_type), max_steps=60, batch_size=16, lr=3e-3, beta=0.1,
                       loss_type=loss_type, eval_every=60, max_len=48)
    trainer = DPOTrainer(config, model=tiny_model, tokenizer=ByteTokenizer(), train_records=train,
                         heldout_records=heldout).setup()
    before = trainer.evaluate()
    assert before["reward_accuracy"] == 0.0 and before["reward_margin"] == 0.0
    history = trainer.train()
    trainer.cleanup()
    after = history[-1]
    assert after["heldout_reward_accuracy"] >= 0.75, after
    assert after["heldout_preference_accuracy"] >= before["preference_accuracy"] + 0.15, (before, after)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_sequence_log_probs_sum_for_dpo_and_average_for_ipo(tmp_path, loss_type):
    """The implicit reward of a response is beta * (log pi - log ref) of the WHOLE response: the sum of its
    tokens' log-probs for DPO (Rafailov et al. eq. 7), their mean for IPO. With a non-zero actor adapter
    (policy != reference) the held-out margin beta * (d_chosen - d_rejected) is recomputed here, response
    by response, from per-token log-probs of the policy (actor scope) and the reference (LoRA off)."""
    torch.manual_seed(0)
    model = PaLM(dim=16, num_tokens=256, depth=1, heads=2, dim_head=8)
    records = rule_preference_pairs(4, seed=2)
    tok = ByteTokenizer()
    config = DPOConfig(out_dir=str(tmp_path / loss_type), max_steps=1, beta=0.5, loss_type=loss_type, max_len=40)
    trainer = DPOTrainer(config, model=model, tokenizer=tok, train_records=records, heldout_records=records).setup()
    with torch.no_grad():
        for p in model.finetune_parameters("actor"):
            p.normal_(0, 1.0)

    def response_logp(prompt, response, **kw):
        packed = pack_sequences(torch.tensor([prompt]), torch.tensor([len(prompt)]), torch.tensor([response]),
                                torch.ones(1, len(response), dtype=torch.bool))
        with torch.no_grad():
            logp = response_log_probs(model, packed, **kw)[0][0]
        return float(logp.sum() if loss_type == "sigmoid" else logp.mean())

    margins = []
    for record in records:
        (pc, c), (pr, r) = encode_pair(record, tok, config.max_len)
        d_c = response_logp(pc, c, finetune_scope="actor") - response_logp(pc, c, disable_lora=True)
        d_r = response_logp(pr, r, finetune_scope="actor") - response_logp(pr, r, disable_lora=True)
        margins.append(0.5 * (d_c - d_r))
    result = trainer.evaluate()
    trainer.cleanup()
    assert max(abs(m) for m in margins) > 0.01  # the adapter makes a difference (the margins' signs vary)
    assert result["reward_margin"] == pytest.approx(sum(margins) / len(margins), rel=1e-3, abs=1e-6)
