"""Byte and BPE tokenizers: lossless round trips, EOS at id 0, save/load."""

import pytest

from palm_rlhf.data.tokenizer import ByteTokenizer, load_tokenizer, train_bpe
from palm_rlhf.errors import DataError

TEXT = "def f(x):\n    return x ** 2  # héllo wörld ✓ 🙂\n"


def test_byte_tokenizer_round_trip(tmp_path):
    tok = ByteTokenizer()
    ids = tok.encode("hé")
    assert ids == [104, 0xC3, 0xA9]  # 'h', then é as two UTF-8 bytes
    assert tok.decode(ids) == "hé" and tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.encode_array(TEXT).tolist() == tok.encode(TEXT)
    assert tok.decode([0xC3]) == "\ufffd"  # a cut UTF-8 sequence decodes with a replacement char
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (256, 0, 0)
    assert load_tokenizer(tok.save(tmp_path)) == tok
    with pytest.raises(DataError, match="outside"):
        tok.decode([300])


def test_bpe_round_trip_and_save(tmp_path):
    pytest.importorskip("tokenizers")
    tok = train_bpe([TEXT * 20, "the quick brown fox " * 50], vocab_size=300)
    assert tok.eos_id == 0 and 258 <= tok.vocab_size <= 300
    ids = tok.encode(TEXT)
    assert 0 not in ids and len(ids) < len(TEXT.encode())  # merges compress; EOS never appears in text
    assert tok.decode(ids) == TEXT
    unseen = "Ωμέγα \x01\x7f ünseen"
    assert tok.decode(tok.encode(unseen)) == unseen  # byte-level alphabet: lossless on unseen text
    assert load_tokenizer(tok.save(tmp_path)) == tok


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="no tokenizer_config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"type": "wordpiece"}')
    with pytest.raises(DataError, match="unknown tokenizer type"):
        load_tokenizer(tmp_path)
