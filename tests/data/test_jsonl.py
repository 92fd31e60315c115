"""The one JSONL reader: every error names the file and line, UTF-8 errors included (issue 16, item 7)."""

from __future__ import annotations

import pytest

from palm_rlhf.data.jsonl import iter_jsonl
from palm_rlhf.data.preferences import read_preferences
from palm_rlhf.errors import DataError


def test_records_and_line_numbers(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n\n{"b": "\u2028 ✓"}\n', encoding="utf-8")
    assert list(iter_jsonl(path, missing="?")) == [(f"{path}:1", {"a": 1}), (f"{path}:3", {"b": "\u2028 ✓"})]


def test_non_utf8_line_is_named(tmp_path):
    path = tmp_path / "prefs.jsonl"
    good = '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
    path.write_bytes(good.encode() * 3 + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n' + good.encode())
    with pytest.raises(DataError) as e:
        list(iter_jsonl(path, missing="?"))
    assert str(e.value) == f"{path}:4: not UTF-8 (byte 16 of the line is b'\\xe9'); save the file as UTF-8"
    with pytest.raises(DataError, match=r"prefs\.jsonl:4: not UTF-8"):
        read_preferences(path)


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: pass a file"):
        list(iter_jsonl(tmp_path / "nope.jsonl", missing="pass a file"))
    (tmp_path / "b.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataError, match=r"b\.jsonl:2: not valid JSON"):
        list(iter_jsonl(tmp_path / "b.jsonl", missing="?"))
