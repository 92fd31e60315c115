import pytest
import torch

from palm_rlhf import PaLM
from palm_rlhf.data.preferences import PairwiseRecord, RatingRecord
from palm_rlhf.data.synthetic import rule_annotator, rule_preference_pairs, rule_score
from palm_rlhf.errors import DataError
from palm_rlhf.model.reward import RewardModel
from palm_rlhf.data.sampling import split_heldout, stream_indices
from palm_rlhf.runtime.vocab import step_positions
from palm_rlhf.trainers.reward_data import (
    encode_records,
    evaluate,
    make_batch,
    record_kind,
    reward_loss,
)


class Bytes:
    def encode(self, s):
        return list(s.encode())


def batch_indices(step, micro, batch_size, accum, n, seed, rank=0, world_size=1):
    """Dataset indices of micro-batch `micro` of step `step` on `rank` (per-process micro-batches of
    batch_size / (accum * world_size)), as the reward trainer draws them."""
    per = batch_size // (accum * world_size)
    return stream_indices(seed, n, step_positions(step, batch_size, per, rank, world_size)[micro])


def test_batch_indices_cover_each_epoch_once_and_split_across_ranks():
    n, b, accum = 10, 4, 2
    # one process: micro-batches of 2, 5 of them = one epoch of 10 distinct indices
    epoch0 = [i for step in range(3) for m in range(accum) for i in batch_indices(step, m, b, accum, n, seed=3)][:n]
    assert sorted(epoch0) == list(range(n))
    # two ranks with micro-batches of 1 see, together, exactly the one-process micro-batch of 2
    for step in range(4):
        for m in range(accum):
            one = batch_indices(step, m, b, accum, n, seed=3)
            two = [batch_indices(step, m, b, accum, n, seed=3, rank=r, world_size=2)[0] for r in range(2)]
            assert one == two
    # a pure function of the step: what a resumed run computes equals the uninterrupted run
    assert batch_indices(7, 1, b, accum, n, seed=3) == batch_indices(7, 1, b, accum, n, seed=3)


def test_rule_annotator_and_pairs():
    """'aeb' has 2/3 vowels, 'bcd' 0: 'aeb' is chosen; a tie gives None."""
    assert rule_score("aeb") == pytest.approx(2 / 3) and rule_score("") == 0.0
    rec = rule_annotator()("p", "bcd", "aeb")
    assert (rec.chosen, rec.rejected) == ("aeb", "bcd")
    assert rule_annotator()("p", "ab", "ba") is None
    pairs = rule_preference_pairs(50, seed=1)
    assert pairs == rule_preference_pairs(50, seed=1) and len(pairs) == 50
    assert all(rule_score(r.chosen) > rule_score(r.rejected) and len(r.chosen) == len(r.rejected) for r in pairs)


def test_mixed_kinds_and_tiny_splits_are_errors():
    mixed = [PairwiseRecord("p", "a", "b"), RatingRecord("p", "a", 1)]
    with pytest.raises(DataError, match="mixes"):
        record_kind(mixed)
    with pytest.raises(DataError, match="nothing to train"):
        split_heldout([PairwiseRecord("p", "a", "b")], 0.5, seed=0)
    train, val = split_heldout(list(range(10)), 0.2, seed=0)
    assert len(train) == 8 and len(val) == 2 and sorted(train + val) == list(range(10))


def test_pairwise_batch_puts_chosen_then_rejected_and_loss_matches_bt():
    torch.manual_seed(0)
    rm = RewardModel(PaLM(num_tokens=256, dim=32, depth=1, heads=2, dim_head=16), dropout=0.0)
    data = encode_records([PairwiseRecord("ab", "cde", "f", margin=0.5), PairwiseRecord("", "gh", "ijkl")], Bytes())
    batch = make_batch(data, [0, 1], max_len=64)
    assert batch["x"].shape == (4, 5) and batch["prompt_lengths"].tolist() == [2, 0, 2, 0]
    assert batch["mask"].sum(1).tolist() == [5, 2, 3, 4]
    loss, out = reward_loss(rm, batch)
    rewards = rm.score([torch.tensor(list(b"ab")), torch.tensor([], dtype=torch.long)] * 2,
                       [torch.tensor(list(s.encode())) for s in ("cde", "gh", "f", "ijkl")])
    gap = rewards[:2] - rewards[2:] - torch.tensor([0.5, 0.0])
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(gap).mean(), atol=1e-5, rtol=1e-5)
    metrics = evaluate(rm, data, batch_size=1, max_len=64, device="cpu")
    assert metrics["accuracy"] == pytest.approx(((rewards[:2] > rewards[2:]).float().mean()).item())


def test_rating_evaluation_reports_accuracy_and_mae():
    torch.manual_seed(0)
    rm = RewardModel(PaLM(num_tokens=256, dim=32, depth=1, heads=2, dim_head=16), dropout=0.0, num_binned_output=3)
    data = encode_records([RatingRecord("p", "a", 0), RatingRecord("p", "bb", 2)], Bytes())
    metrics = evaluate(rm, data, batch_size=2, max_len=16, device="cpu")
    pred = rm.score([torch.tensor([112])] * 2, [torch.tensor([97]), torch.tensor([98, 98])])
    assert metrics["mae"] == pytest.approx(((pred - torch.tensor([0.0, 2.0])).abs().mean()).item(), abs=1e-5)
    assert set(metrics) == {"accuracy", "mae", "loss"}
