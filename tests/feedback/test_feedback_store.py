"""Storage, issuing rules, stats arithmetic, raters files and export, without HTTP."""

from __future__ import annotations

import pytest

from palm_rlhf.data.preferences import PairwiseRecord, read_preferences
from palm_rlhf.errors import DataError
from palm_rlhf.feedback.auth import add_rater, csrf_ok, csrf_token, find_rater, read_raters
from palm_rlhf.feedback.export import export_preferences
from palm_rlhf.feedback.stats import compute_stats
from palm_rlhf.feedback.store import FeedbackStore, Judgement, JudgementRejected


def fill(store: FeedbackStore, n: int, ckpt_b: str = "m1") -> None:
    for i in range(n):
        store.add_item(f"prompt {i}", f"a{i}", f"b{i}", "m1", ckpt_b, {"temperature": 1.0})


def test_wal_mode_and_issue_judge_once(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")
    assert store.journal_mode() == "wal"
    fill(store, 2)
    assert store.ready_count() == 2
    pair = store.next_pair("alice")
    assert (pair.prompt, pair.completion_a, pair.completion_b) == ("prompt 0", "a0", "b0")
    assert store.ready_count() == 1
    # a reload before judging shows the same pair, it does not burn a new one
    assert store.next_pair("alice").pair_id == pair.pair_id
    j = store.judge("alice", pair.pair_id, "a", rating=4, comment="  clearer  ")
    assert (j.rater, j.choice, j.rating, j.comment, j.checkpoint_a, j.sampling) == (
        "alice", "a", 4, "clearer", "m1", {"temperature": 1.0})
    assert j.issued_at <= j.judged_at
    with pytest.raises(JudgementRejected) as replay:
        store.judge("alice", pair.pair_id, "b")
    assert replay.value.status == 409
    assert store.judged_count() == 1 and store.judgements()[0].choice == "a"


def test_forged_and_cross_rater_ids_are_rejected_alike(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")
    fill(store, 1)
    pair = store.next_pair("alice")
    for rater, pair_id in [("alice", "forged-id"), ("bob", pair.pair_id), ("alice", "")]:
        with pytest.raises(JudgementRejected) as e:
            store.judge(rater, pair_id, "a")
        assert e.value.status in (404, 422)
    assert store.judged_count() == 0
    # the rightful rater can still judge it
    store.judge("alice", pair.pair_id, "tie")
    assert store.judged_count() == 1


@pytest.mark.parametrize("choice,rating,comment", [("c", None, ""), ("a", 6, ""), ("a", 0, ""), ("a", "x", ""),
                                                   ("a", None, "x" * 2001), ("a", None, 5)])
def test_invalid_judgement_fields_are_422(tmp_path, choice, rating, comment):
    store = FeedbackStore(tmp_path / "f.sqlite")
    fill(store, 1)
    pair = store.next_pair("alice")
    with pytest.raises(JudgementRejected) as e:
        store.judge("alice", pair.pair_id, choice, rating, comment)
    assert e.value.status == 422
    assert store.judged_count() == 0


def test_reopen_keeps_judgements_prepared_and_pending_pairs(tmp_path):
    path = tmp_path / "f.sqlite"
    store = FeedbackStore(path)
    fill(store, 3)
    first = store.next_pair("alice")
    store.judge("alice", first.pair_id, "b")
    pending = store.next_pair("alice")
    secret = store.secret()
    store.close()

    store = FeedbackStore(path)
    assert store.judged_count() == 1 and store.judgements()[0].pair_id == first.pair_id
    assert store.next_pair("alice").pair_id == pending.pair_id  # the pending pair survived
    assert store.ready_count() == 1 and store.item_count() == 3
    assert store.secret() == secret  # CSRF tokens of open pages stay valid across restarts


def test_shared_pairs_go_to_at_most_two_different_raters(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite", seed=0)
    fill(store, 4)
    p = store.next_pair("alice", shared_fraction=1.0)   # nothing judged yet: a fresh item
    store.judge("alice", p.pair_id, "a")
    q = store.next_pair("bob", shared_fraction=1.0)     # bob gets the item alice judged
    assert (q.prompt, q.completion_a) == (p.prompt, p.completion_a) and q.pair_id != p.pair_id
    store.judge("bob", q.pair_id, "a")
    r = store.next_pair("carol", shared_fraction=1.0)   # already two raters: carol gets a fresh one
    assert r.prompt == "prompt 1"
    s = store.next_pair("alice", shared_fraction=1.0)   # alice never sees an item twice
    assert s.prompt == "prompt 2"


def _j(i, item, rater, choice, a="m1", b="m2"):
    return Judgement(id=i, pair_id=f"p{i}", item_id=item, rater=rater, choice=choice, rating=None, comment="",
                     prompt="p", completion_a="x", completion_b="y", checkpoint_a=a, checkpoint_b=b,
                     sampling={}, issued_at=0.0, judged_at=1.0)


def test_stats_by_hand():
    """Items 1 and 2 are judged by alice and bob, item 3 by alice only.

    agreement: item 1 a/a agrees, item 2 b/tie disagrees -> 1 of 2 = 0.5.
    m1 vs m2 (m1 always on side A; item 4 has m2 on side A):
      j1 a -> m1 win, j2 a -> m1 win, j3 b -> m2 win, j4 tie, j5 both_bad, j6 a (m2 on A) -> m2 win
      m1: wins 2, losses 2, ties 1, both_bad 1 -> (2 + 0.5) / 5 = 0.5
      m2: wins 2, losses 2, ties 1           -> 0.5
    j7 is a same-checkpoint pair and does not count for win-rates.
    """
    js = [_j(1, 1, "alice", "a"), _j(2, 1, "bob", "a"), _j(3, 2, "alice", "b"), _j(4, 2, "bob", "tie"),
          _j(5, 3, "alice", "both_bad"), _j(6, 4, "bob", "a", a="m2", b="m1"), _j(7, 5, "bob", "b", a="m1", b="m1")]
    s = compute_stats(js)
    assert s.total == 7
    assert [(r.rater, r.judged) for r in s.raters] == [("alice", 3), ("bob", 4)]
    assert s.raters[1].choices == {"a": 2, "b": 1, "tie": 1, "both_bad": 0}
    assert (s.shared_items, s.compared_pairs, s.agreeing_pairs, s.agreement) == (2, 2, 1, 0.5)
    m1, m2 = s.checkpoints
    assert (m1.checkpoint, m1.wins, m1.losses, m1.ties, m1.both_bad, m1.win_rate) == ("m1", 2, 2, 1, 1, 0.5)
    assert (m2.checkpoint, m2.wins, m2.losses, m2.ties, m2.both_bad, m2.win_rate) == ("m2", 2, 2, 1, 1, 0.5)


def test_stats_win_rate_uneven():
    """m1 wins 3, loses 1, ties 0 -> 3/4 = 0.75; m2 wins 1 of 4 -> 0.25; no shared items -> agreement None."""
    js = [_j(1, 1, "a1", "a"), _j(2, 2, "a1", "a"), _j(3, 3, "a1", "b"), _j(4, 4, "a1", "b", a="m2", b="m1")]
    s = compute_stats(js)
    assert [c.win_rate for c in s.checkpoints] == [0.75, 0.25]
    assert s.agreement is None


def test_export_ab_to_pairwise_records(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")
    fill(store, 4, ckpt_b="m2")
    for choice, rating in [("a", 5), ("b", 1), ("tie", 3), ("both_bad", None)]:
        store.judge("alice", store.next_pair("alice").pair_id, choice, rating)
    out = tmp_path / "prefs.jsonl"
    summary = export_preferences(store, out, margin_from_rating=True)
    assert summary.written == 2 and summary.skipped == {"tie": 1, "both_bad": 1, "identical": 0}
    records = read_preferences(out)
    assert records == [
        PairwiseRecord("prompt 0", "a0", "b0", margin=1.0, annotator="alice", source="feedback:m1 vs m2"),
        PairwiseRecord("prompt 1", "b1", "a1", margin=0.0, annotator="alice", source="feedback:m2 vs m1"),
    ]
    export_preferences(store, out)  # without --margin-from-rating the margin stays 0
    assert [r.margin for r in read_preferences(out)] == [0.0, 0.0]


def test_export_with_nothing_to_export_names_the_reason(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")
    fill(store, 1)
    store.judge("alice", store.next_pair("alice").pair_id, "tie")
    with pytest.raises(DataError, match="no A/B judgements"):
        export_preferences(store, tmp_path / "prefs.jsonl")


def test_raters_file(tmp_path):
    path = tmp_path / "raters.txt"
    token = add_rater(path, "alice")
    add_rater(path, "bob")
    raters = read_raters(path)
    assert raters[token] == "alice" and sorted(raters.values()) == ["alice", "bob"]
    assert find_rater(raters, token) == "alice"
    assert find_rater(raters, token[:-1]) is None and find_rater(raters, None) is None
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(DataError, match="already exists"):
        add_rater(path, "alice")
    for text, needle in [("alice short\n", "shorter"), ("alice\n", "expected `name token`"),
                         ("a b c\n", "expected"), ("al ice-token-0123456789 x\n", "expected"),
                         ("<x> tokentokentokentoken\n", "rater name"),
                         ("a tokentokentokentoken\na tokentokentokentoken2\n", "listed twice"),
                         ("# only a comment\n", "no raters")]:
        path.write_text(text)
        with pytest.raises(DataError, match=needle):
            read_raters(path)


def test_csrf_token_is_bound_to_rater_and_secret():
    assert csrf_ok(b"s", "alice", csrf_token(b"s", "alice"))
    assert not csrf_ok(b"s", "bob", csrf_token(b"s", "alice"))
    assert not csrf_ok(b"t", "alice", csrf_token(b"s", "alice"))
    assert not csrf_ok(b"s", "alice", None) and not csrf_ok(b"s", "alice", "")
