import json

import pytest

from palm_rlhf.data.preferences import (
    PairwiseRecord,
    RatingRecord,
    append_preferences,
    read_preferences,
    write_preferences,
)
from palm_rlhf.errors import DataError


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_round_trip_keeps_every_field(tmp_path):
    records = [
        PairwiseRecord("p", "good", "bad", margin=0.5, annotator="ana", source="webapp"),
        PairwiseRecord("p2", "yes", "no"),
        RatingRecord("q", "answer", 3),
    ]
    path = tmp_path / "prefs.jsonl"
    write_preferences(path, records)
    assert read_preferences(path) == records
    # optional fields at their defaults are not written
    second = json.loads(path.read_text().splitlines()[1])
    assert second == {"prompt": "p2", "chosen": "yes", "rejected": "no"}


def test_append_adds_whole_lines(tmp_path):
    path = tmp_path / "prefs.jsonl"
    append_preferences(path, [PairwiseRecord("a", "b", "c")])
    append_preferences(path, [PairwiseRecord("d", "e", "f", annotator="x")])
    assert [r.prompt for r in read_preferences(path)] == ["a", "d"]


def test_blank_lines_are_ignored_and_unicode_survives(tmp_path):
    path = _write_lines(tmp_path / "p.jsonl", ['{"prompt": "é", "chosen": "ü", "rejected": "ñ"}', "", "   "])
    assert read_preferences(path) == [PairwiseRecord("é", "ü", "ñ")]


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"prompt": "p", "chosen": "a"}', "line 2.*missing field 'rejected'"),
        ('{"prompt": "p", "chosen": "a", "rejected": "b", "score": 1}', "line 2.*unknown field 'score'"),
        ('{"prompt": "p", "chosen": 3, "rejected": "b"}', "line 2.*'chosen' must be a string"),
        ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": -1}', "line 2.*'margin'"),
        ('{"prompt": "p", "chosen": "a", "rejected": "a"}', "line 2.*identical"),
        ('{"prompt": "p", "response": "a", "rating": "high"}', "line 2.*'rating' must be a finite number"),
        ('{"prompt": "p", "response": "a", "rating": true}', "line 2.*'rating'"),
        ('{"prompt": "p", "response": "a", "rating": NaN}', "line 2.*'rating'"),
        ('{"prompt": "p", "text": "a"}', "line 2.*neither pairwise"),
        ('["p", "a", "b"]', "line 2.*JSON object"),
        ('{"prompt": "p", "chosen": "a", "rejected": ', "line 2.*not valid JSON"),
    ],
)
def test_malformed_record_names_line_and_field(tmp_path, line, expected):
    good = '{"prompt": "p", "chosen": "a", "rejected": "b"}'
    path = _write_lines(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(DataError, match=expected.replace("line 2", r"bad\.jsonl:2:")):
        read_preferences(path)


def test_rating_out_of_range_is_an_error(tmp_path):
    path = _write_lines(tmp_path / "r.jsonl", ['{"prompt": "p", "response": "a", "rating": 7}'])
    assert read_preferences(path)[0].rating == 7
    with pytest.raises(DataError, match=r"r\.jsonl:1:.*'rating'.*\[0, 4\]"):
        read_preferences(path, rating_range=(0, 4))


def test_empty_and_missing_files_are_errors(tmp_path):
    empty = _write_lines(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(DataError, match="empty"):
        read_preferences(empty)
    with pytest.raises(DataError, match="not found"):
        read_preferences(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="empty"):
        write_preferences(tmp_path / "x.jsonl", [])


def test_line_separator_characters_inside_text_round_trip(tmp_path):
    """Records are written with ensure_ascii=False, so U+2028 / U+0085 appear raw in the file;
    the reader splits lines on "\\n" only and must read them back unchanged."""
    from palm_rlhf.data.preferences import PairwiseRecord, read_preferences, write_preferences

    record = PairwiseRecord("a\u2028prompt", "chosen\u0085text", "rejected\x1ctext")
    write_preferences(tmp_path / "p.jsonl", [record])
    (back,) = read_preferences(tmp_path / "p.jsonl")
    assert (back.prompt, back.chosen, back.rejected) == (record.prompt, record.chosen, record.rejected)
