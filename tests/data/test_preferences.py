"""Preference JSONL files as text: what the shared JSONL reader must survive."""


def test_line_separator_characters_inside_text_round_trip(tmp_path):
    """Records are written with ensure_ascii=False, so U+2028 / U+0085 appear raw in the file;
    the reader splits lines on "\\n" only and must read them back unchanged."""
    from palm_rlhf.data.preferences import PairwiseRecord, read_preferences, write_preferences

    record = PairwiseRecord("a\u2028prompt", "chosen\u0085text", "rejected\x1ctext")
    write_preferences(tmp_path / "p.jsonl", [record])
    (back,) = read_preferences(tmp_path / "p.jsonl")
    assert (back.prompt, back.chosen, back.rejected) == (record.prompt, record.chosen, record.rejected)
