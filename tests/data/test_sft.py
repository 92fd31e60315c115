"""SFT records: strict reader (line + field), prompt+response+EOS encoding, response-only mask."""

import pytest

from palm_rlhf.data.sampling import split_heldout, stream_indices
from palm_rlhf.data.sft import SFTRecord, encode_sft, read_sft, sft_batch
from palm_rlhf.data.tokenizer import ByteTokenizer
from palm_rlhf.errors import DataError


def test_mask_covers_response_and_eos_only():
    """prompt "ab" (97, 98), response "c" (99) + EOS 0: tokens [97, 98, 99, 0]; targets [98, 99, 0]
    and only targets 99 and 0 (positions 1, 2) count. Row 2 ("x" -> "yz") pads to width 4."""
    ex = encode_sft([SFTRecord("ab", "c"), SFTRecord("x", "yz")], ByteTokenizer(), max_len=16)
    assert ex == [([97, 98, 99, 0], 2), ([120, 121, 122, 0], 1)]
    tokens, mask = sft_batch(ex)
    assert tokens.tolist() == [[97, 98, 99, 0], [120, 121, 122, 0]]
    assert mask.tolist() == [[False, True, True], [True, True, True]]
    tokens, mask = sft_batch([([1, 2, 0], 1), ([5, 6, 7, 8, 0], 3)])
    assert tokens.tolist() == [[1, 2, 0, 0, 0], [5, 6, 7, 8, 0]]
    assert mask.tolist() == [[True, True, False, False], [False, False, True, True]]


def test_truncation_keeps_prompt_tail_and_response_head():
    """max_len 5 -> 6 tokens: prompt 'abcdefgh' keeps its last 3 ('fgh'), response 'XYZW' + EOS its first 3."""
    (ids, n_prompt), = encode_sft([SFTRecord("abcdefgh", "XYZW")], ByteTokenizer(), max_len=5)
    assert bytes(ids[:n_prompt]) == b"fgh" and bytes(ids[n_prompt:]) == b"XYZ" and n_prompt == 3


def test_reader_names_line_and_field(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r"sft.jsonl:3: missing field 'response'"):
        read_sft(path)
    path.write_text('{"prompt": "a", "response": 5}\n')
    with pytest.raises(DataError, match=r":1: field 'response' must be a string, got int"):
        read_sft(path)
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "b",}\n')
    with pytest.raises(DataError, match=r":2: not valid JSON"):
        read_sft(path)
    path.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_sft(path)
    with pytest.raises(DataError, match="no such"):
        read_sft(tmp_path / "missing.jsonl")


def test_split_is_deterministic_and_disjoint():
    recs = [SFTRecord(str(i), "r") for i in range(20)]
    train, val = split_heldout(recs, 0.1, seed=3)
    assert len(val) == 2 and len(train) == 18 and not set(train) & set(val)
    assert split_heldout(recs, 0.1, seed=3) == (train, val)
    assert split_heldout(recs, 0.1, seed=4) != (train, val)  # shuffled by the seed, not the file order
    assert split_heldout(recs, 0.0, seed=3) == (recs, [])


def test_the_stream_visits_every_example_once_per_epoch_in_a_seeded_order():
    n = 7
    first, second = stream_indices(2, n, range(n)), stream_indices(2, n, range(n, 2 * n))
    assert sorted(first) == sorted(second) == list(range(n)) and first != second
    assert stream_indices(2, n, [3, 9]) == [first[3], second[2]]
