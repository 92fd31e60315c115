"""A Hugging Face checkpoint's tokenizer read through `tokenizers` gives transformers' ids: plain text
(the add-BOS rule, never a double BOS), special tokens, stop ids; errors name the fix."""

import json

import pytest

from tests.helpers.hf_tokenizers import CHATML_SPECIALS, LLAMA3_SPECIALS, build, chatml, llama3, reference
from palm_rlhf.data.hf_tokenizer import HFTokenizer
from palm_rlhf.data.tokenizer import ByteTokenizer, load_tokenizer, load_tokenizer_or_bytes, train_bpe
from palm_rlhf.errors import DataError

pytest.importorskip("transformers")

TEXTS = ["Hello there <tool> x<|pad|>", " how are you today?", "", "<|im_start|>user\nHi<|im_end|>",
         "two <|eot_id|>plus",
         "Ünïcödé ✓ text\n\n  spaced"]


def llama_like(directory, config=None):
    return build(directory, LLAMA3_SPECIALS, post_bos="<|begin_of_text|>",
                 config={"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", **(config or {})})


CASES = {
    "chatml, no BOS": lambda d: chatml(d),
    "BOS from tokenizer.json's post-processor": lambda d: llama3(d),
    "add_bos_token=true and a post-processor that adds BOS too": lambda d: llama_like(d, {"add_bos_token": True}),
    "add_bos_token=false, the post-processor adds BOS": lambda d: llama_like(d, {"add_bos_token": False}),
    "add_bos_token and add_eos_token, a post-processor that adds nothing": lambda d: build(
        d, CHATML_SPECIALS, config={"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "add_bos_token": True,
                                    "add_eos_token": True}),
    "a pad token and an added token the tokenizer.json lacks": lambda d: chatml(d, config={
        "pad_token": "<|pad|>", "added_tokens_decoder": {"400": {"content": "<tool>", "special": False}}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_encode_decode_and_special_ids_match_transformers(tmp_path, case):
    directory = CASES[case](tmp_path / "tok")
    ref, ours = reference(directory), load_tokenizer(directory)
    assert isinstance(ours, HFTokenizer)
    for text in TEXTS:
        assert ours.encode(text) == ref(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]
        ids = ref(text)["input_ids"]
        assert ours.decode(ids) == ref.decode(ids)
    assert ours.vocab_size == len(ref)
    assert (ours.bos_id, ours.eos_id) == (ref.bos_token_id, ref.eos_token_id)
    assert ours.pad_id == (ref.pad_token_id if ref.pad_token_id is not None else ref.eos_token_id)
    bos = ours.encode("Hello")[:1] == [ours.bos_id]
    assert ours.add_bos == bos
    assert ours.encode("Hello").count(ours.bos_id) <= 1 if ours.bos_id is not None else True


def test_the_bos_rule_on_each_case(tmp_path):
    """What each case gives, spelled out (transformers 5 with a tokenizer.json: its post-processor
    decides, the config's add_bos_token/add_eos_token are ignored): BOS once or never, never twice."""
    got = {case: load_tokenizer(make(tmp_path / str(i))).encode("Hello")
           for i, (case, make) in enumerate(CASES.items())}
    tok = load_tokenizer(tmp_path / "1")
    bos, hello = tok.bos_id, tok.encode("Hello", add_special_tokens=False)
    assert got["BOS from tokenizer.json's post-processor"] == [bos] + hello
    assert got["add_bos_token=true and a post-processor that adds BOS too"] == [bos] + hello
    assert got["add_bos_token=false, the post-processor adds BOS"] == [bos] + hello
    four = load_tokenizer(tmp_path / "4")
    assert got["add_bos_token and add_eos_token, a post-processor that adds nothing"] == \
        four.encode("Hello", add_special_tokens=False)
    assert [load_tokenizer(tmp_path / str(i)).add_bos for i in range(6)] == [False, True, True, True, False, False]


def test_ids_past_the_vocabulary_decode_to_nothing_as_in_transformers(tmp_path):
    """A checkpoint's embedding may have more rows than the tokenizer has ids (Qwen pads it)."""
    directory = chatml(tmp_path / "tok")
    tok, ref = load_tokenizer(directory), reference(directory)
    ids = tok.encode("Hello") + [tok.vocab_size, tok.vocab_size + 7] + tok.encode(" there")
    assert tok.decode(ids) == ref.decode(ids) == "Hello there"
    with pytest.raises(DataError, match="negative"):
        tok.decode([-1])


def test_eos_ids_gather_tokenizer_and_generation_config(tmp_path):
    tok = load_tokenizer(llama3(tmp_path / "a"))  # eos_token <|end_of_text|> = 1, generation [1, 4]
    assert tok.eos_ids == (1, 4) and tok.eos_id == 1 and tok.bos_id == 0
    tok = load_tokenizer(chatml(tmp_path / "b", generation={"eos_token_id": 0}))  # an int
    assert tok.eos_ids == (2, 0) and tok.eos_id == 2
    assert load_tokenizer(chatml(tmp_path / "c")).eos_ids == (2,)
    assert ByteTokenizer().eos_ids == (0,) and ByteTokenizer().bos_id is None


def test_chat_template_file_wins_over_the_config(tmp_path):
    directory = chatml(tmp_path / "tok")
    assert load_tokenizer(directory).chat_template.startswith("{%- if messages[0]")
    (directory / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tok = load_tokenizer(directory)
    assert tok.chat_template == reference(directory).chat_template == \
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def test_save_writes_the_files_back_unchanged(tmp_path):
    src = llama3(tmp_path / "src")
    (src / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    tok = load_tokenizer(src)
    out = tok.save(tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert load_tokenizer(out) == tok


def test_our_formats_still_load_and_are_told_apart_by_content(tmp_path):
    bpe = train_bpe(["hello world, hello there"] * 20, vocab_size=300)
    bpe.save(tmp_path / "bpe")
    ByteTokenizer().save(tmp_path / "byte")
    assert load_tokenizer(tmp_path / "bpe") == bpe and type(load_tokenizer(tmp_path / "byte")) is ByteTokenizer
    assert load_tokenizer_or_bytes(tmp_path) == ByteTokenizer()  # nothing saved
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "tokenizer_config.json").write_text('{"type": "wordpiece"}')
    with pytest.raises(DataError, match="unknown tokenizer type 'wordpiece'"):
        load_tokenizer(tmp_path / "odd")


def test_errors_are_one_line_with_the_fix(tmp_path):
    directory = chatml(tmp_path / "tok")
    (directory / "tokenizer.json").unlink()
    with pytest.raises(DataError, match=r"no tokenizer.json beside tokenizer_config.json; copy the tokenizer files") \
            as e:
        load_tokenizer(directory)
    assert "\n" not in str(e.value)
    (directory / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": 3')
    with pytest.raises(DataError, match=r"tokenizer.json: cannot load it with `tokenizers` .*copy the tokenizer"):
        load_tokenizer(directory)
    directory = chatml(tmp_path / "tok2")
    (directory / "generation_config.json").write_text("{not json")
    with pytest.raises(DataError, match=r"generation_config.json: unreadable generation config"):
        load_tokenizer(directory)
    directory = build(tmp_path / "noeos", CHATML_SPECIALS, config={})
    with pytest.raises(DataError, match=r'no EOS token \(set "eos_token" in tokenizer_config.json'):
        load_tokenizer(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 99999]}))
    with pytest.raises(DataError, match="eos_token_id 99999 is outside the vocabulary"):
        load_tokenizer(directory)


def test_a_checkpoint_directory_resolves_to_its_hf_tokenizer(tmp_path):
    """A model directory with a Hugging Face tokenizer beside config.json: `_source` finds it, and
    tokenizer= may name such a directory or its tokenizer.json."""
    import torch

    from palm_rlhf.model import PaLM
    from palm_rlhf.runtime.resolve import load_tokenizer_for, resolve_model

    directory = llama3(tmp_path / "model")
    torch.manual_seed(0)
    PaLM(dim=16, num_tokens=load_tokenizer(directory).vocab_size, depth=1, heads=2,
         dim_head=8).save_pretrained(directory)
    source = resolve_model(directory)
    assert source.tokenizer_dir == directory
    assert load_tokenizer_for(source) == load_tokenizer(directory)
    assert load_tokenizer_for(None, override=str(directory)) == load_tokenizer(directory)
    assert load_tokenizer_for(None, override=str(directory / "tokenizer.json")) == load_tokenizer(directory)
