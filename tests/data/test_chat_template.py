"""Jinja chat templates give exactly transformers' apply_chat_template ids; chat SFT trains on the
assistant turns only; DPO and RL chat data render through the same template."""

import json

import pytest

from tests.helpers.hf_tokenizers import CHATML, CONVERSATIONS, LLAMA3, chatml, llama3, reference
from palm_rlhf.data.chat import (ChatTemplate, JinjaChatTemplate, encode_conversation, encode_reply, prompt_ids,
                                 template_for)
from palm_rlhf.data.preferences import PairwiseRecord, read_preferences
from palm_rlhf.data.prompts import read_prompts
from palm_rlhf.data.sft import ChatRecord, encode_sft, read_sft, sample_prompt, sft_batch
from palm_rlhf.data.tokenizer import ByteTokenizer, load_tokenizer
from palm_rlhf.errors import DataError

pytest.importorskip("transformers")

FAMILIES = {"chatml": chatml, "llama3": llama3}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    directory = FAMILIES[request.param](tmp_path_factory.mktemp(request.param) / "tok")
    tok = load_tokenizer(directory)
    return request.param, tok, template_for(tok), reference(directory)


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_prompt_ids_equal_transformers_apply_chat_template(family, conversation):
    _, tok, template, ref = family
    messages = CONVERSATIONS[conversation]
    assert isinstance(template, JinjaChatTemplate)
    want = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert prompt_ids(template, tok, messages) == want
    text = ref.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert template.render(messages, add_generation_prompt=False) == text


def test_the_rendered_prompts_are_what_the_templates_say(family):
    """Independent of transformers: the strings each template writes."""
    name, tok, template, _ = family
    text = template.render(CONVERSATIONS[0])
    if name == "chatml":
        assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                        "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n")
        assert tok.decode(prompt_ids(template, tok, CONVERSATIONS[0])) == text
    else:
        assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n")
        ids = prompt_ids(template, tok, CONVERSATIONS[0])
        assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id  # the template's BOS, not a second one


def test_jinja_helpers_render_as_in_transformers(tmp_path):
    """tojson (no HTML escaping, indent), namespace, loop controls, dict(), {% generation %}."""
    helpers = ("{%- set ns = namespace(n=0) %}{%- for m in messages %}{%- set ns.n = ns.n + 1 %}"
               "{%- if m.role == 'system' %}{% continue %}{% endif %}"
               "{% generation %}{{ m | tojson }}{{ m | tojson(indent=2) }}{% endgeneration %}"
               "{%- if loop.index > 2 %}{% break %}{% endif %}{%- endfor %}"
               "{{ ns.n }}{{ dict(a=1) | tojson }}{{ dict.fromkeys(['k'], 0) | tojson }}"
               "{{ bos_token is defined }}{{ eos_token }}")
    directory = chatml(tmp_path / "tok", template=helpers)
    tok = load_tokenizer(directory)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "<b>&amp; \"ünï\"</b>"},
                {"role": "assistant", "content": "A"}, {"role": "user", "content": "never shown"}]
    want = reference(directory).apply_chat_template(messages, tokenize=False)
    assert template_for(tok).render(messages, add_generation_prompt=False) == want
    assert '"content": "<b>&amp; \\"ünï\\"</b>"' in want  # tojson: no HTML escaping, no \\u escapes
    assert "never shown" not in want and want.endswith('3{"a": 1}{"k": 0}False<|im_end|>')  # no bos_token in ChatML


def test_strftime_now_and_the_sandbox(tmp_path):
    tok = load_tokenizer(chatml(tmp_path / "a", template="{{ strftime_now('%Y') }}"))
    assert template_for(tok).render(CONVERSATIONS[0]).isdigit()
    tok = load_tokenizer(chatml(tmp_path / "b", template="{{ messages.__class__.__mro__ }}"))
    with pytest.raises(DataError, match="chat template"):  # the sandbox refuses dunder access
        template_for(tok).render(CONVERSATIONS[0])


def test_template_errors_carry_the_templates_message(tmp_path):
    tok = load_tokenizer(chatml(tmp_path / "tok"))
    with pytest.raises(DataError, match="Only system, user and assistant roles are supported, got tool"):
        prompt_ids(template_for(tok), tok, [{"role": "tool", "content": "42"}])
    bad = load_tokenizer(chatml(tmp_path / "bad", template="{% for m in messages %}{{ m.content }"))
    with pytest.raises(DataError, match=r"the chat template does not parse \(line 1: .*\); fix it there"):
        template_for(bad)


def test_a_model_without_a_jinja_template_uses_ours(tmp_path):
    assert template_for(ByteTokenizer()) == ChatTemplate()
    custom = ChatTemplate(user="<u>{content}</u>", generation_prompt="<a>")
    custom.save(tmp_path)
    assert template_for(ByteTokenizer(), tmp_path) == custom
    tok = load_tokenizer(chatml(tmp_path / "tok"))  # a Jinja template beats chat_template.json
    assert isinstance(template_for(tok, tmp_path), JinjaChatTemplate)


# ---------------------------------------------------------------------- SFT on chat data

TURNS = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello there"},
         {"role": "assistant", "content": "I am fine, thanks for asking."},
         {"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}]


def runs(ids, trained):
    """The maximal runs of trained ids, as lists."""
    out, cur = [], []
    for i, t in zip(ids, trained):
        if t:
            cur.append(i)
        elif cur:
            out, cur = out + [cur], []
    return out + ([cur] if cur else [])


def test_chat_sft_trains_on_exactly_the_assistant_turns_chatml(tmp_path):
    directory = chatml(tmp_path / "tok")
    tok, ref = load_tokenizer(directory), reference(directory)
    template = template_for(tok)
    ids, trained = encode_conversation(template, tok, TURNS)
    assert ids == ref.apply_chat_template(TURNS, tokenize=True)["input_ids"]  # the whole conversation
    # each trained run is one assistant message as ChatML renders it, end-of-turn token included
    assert [tok.decode(run) for run in runs(ids, trained)] == \
        ["I am fine, thanks for asking.<|im_end|>\n", "Four.<|im_end|>\n"]
    # and every assistant token is trained: the assistant turns' ids are exactly the trained ones
    per_turn = [tok.encode(m["content"] + "<|im_end|>\n", add_special_tokens=False) for m in TURNS if
                m["role"] == "assistant"]
    assert runs(ids, trained) == per_turn
    # what is not trained is the rest: system, users, and the "<|im_start|>assistant\n" headers
    assert tok.decode([i for i, t in zip(ids, trained) if not t]) == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
        "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n")
    # the batch mask over targets tokens[1:] is trained[1:]
    (example,) = encode_sft([ChatRecord(tuple(TURNS))], tok, max_len=512, template=template)
    tokens, mask = sft_batch([example, ([5, 6, 7], 1)], tok.pad_id)
    assert tokens[0, : len(ids)].tolist() == ids and mask[0, : len(ids) - 1].tolist() == trained[1:]
    assert mask[0, len(ids) - 1:].sum() == 0 and mask[1].tolist()[:2] == [True, True]


def test_chat_sft_llama3_masks_content_and_eot(tmp_path):
    tok = load_tokenizer(llama3(tmp_path / "tok"))
    ids, trained = encode_conversation(template_for(tok), tok, TURNS)
    assert [tok.decode(run) for run in runs(ids, trained)] == \
        ["I am fine, thanks for asking.<|eot_id|>", "Four.<|eot_id|>"]
    assert ids[0] == tok.bos_id and not trained[0]


def test_chat_sft_with_our_plain_template_adds_eos_after_each_reply():
    tok = ByteTokenizer()
    ids, trained = encode_conversation(ChatTemplate(), tok, TURNS[1:])
    assert [bytes(run) for run in runs(ids, trained)] == [b" I am fine, thanks for asking.\n\x00", b" Four.\n\x00"]
    assert bytes(i for i, t in zip(ids, trained) if not t) == \
        b"User: Hello there\nAssistant:User: What is two plus two?\nAssistant:"


def test_chat_sft_truncation_and_records(tmp_path):
    tok = ByteTokenizer()
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"messages": TURNS}) + "\n" + json.dumps({"prompt": "a", "response": "b"}) + "\n")
    records = read_sft(path)
    assert records[0] == ChatRecord(tuple(TURNS)) and records[1].prompt == "a"
    examples = encode_sft(records, tok, max_len=60)
    assert len(examples[0][0]) == 61  # cut to max_len + 1 from the end
    assert sample_prompt(records[0], tok)[0] == tok.encode("System: Be kind.\nUser: Hello there\nAssistant:")
    with pytest.raises(DataError, match="no SFT example has an assistant token"):
        encode_sft(records[:1], tok, max_len=20)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"sft.jsonl:1: messages has no assistant message"):
        read_sft(path)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": 3}]}) + "\n")
    with pytest.raises(DataError, match=r"sft.jsonl:1: messages\[0\]: expected"):
        read_sft(path)


# ---------------------------------------------------------------------- DPO pairs and RL prompts


def test_conversational_pairs_render_through_the_template(tmp_path):
    directory = chatml(tmp_path / "tok")
    tok, ref = load_tokenizer(directory), reference(directory)
    template = template_for(tok)
    prompt = [{"role": "user", "content": "What is two plus two?"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": "Four."}],
                                "rejected": "Five."}) + "\n")
    (record,) = read_preferences(path)
    assert record.is_chat and record.to_dict()["rejected"] == "Five."
    assert PairwiseRecord(**record.to_dict()) == record and hash(record) == hash(PairwiseRecord(**record.to_dict()))
    for reply in (record.chosen, record.rejected):
        p, r = encode_reply(template, tok, list(record.prompt), reply)
        assert p == ref.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"]
        content = reply if isinstance(reply, str) else reply[0]["content"]
        full = ref.apply_chat_template(prompt + [{"role": "assistant", "content": content}], tokenize=True)
        assert p + r == full["input_ids"] and tok.decode(r) == content + "<|im_end|>\n"
    from palm_rlhf.trainers.dpo import encode_pair
    (p1, r1), (p2, r2) = encode_pair(record, tok, max_len=64, template=template)
    assert p1 == p2 == prompt_ids(template, tok, prompt) and tok.decode(r2) == "Five.<|im_end|>\n"
    path.write_text(json.dumps({"prompt": "Q", "chosen": [{"role": "assistant", "content": "A"}],
                                "rejected": "B"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:1: .*'prompt' is a string"):
        read_preferences(path)


def test_chat_prompts_for_rl(tmp_path):
    directory = llama3(tmp_path / "tok")
    tok, ref = load_tokenizer(directory), reference(directory)
    path = tmp_path / "prompts.jsonl"
    chat = [{"role": "user", "content": "Hello there"}]
    path.write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"prompt": "plain text"}) + "\n")
    with pytest.raises(DataError, match=r"prompts.jsonl:1: a chat prompt"):
        read_prompts(path)  # the feedback app shows text prompts
    assert read_prompts(path, messages=True) == [chat, "plain text"]
    from palm_rlhf.trainers.rl_setup import load_prompts
    first, second = load_prompts(path, tok)
    assert first.tolist() == ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert second.tolist() == ref("plain text")["input_ids"]  # a text prompt: BOS + text


def test_a_token_across_a_span_edge_goes_with_its_first_character(tmp_path):
    """When the pieces between span edges tokenize differently from the whole text (an edge inside a
    word), the whole text's ids are kept and each token follows the span its first character is in."""
    from palm_rlhf.data.chat import _encode_spans

    tok = load_tokenizer(chatml(tmp_path / "tok"))
    whole = tok.encode("Hello there", add_special_tokens=False)
    assert tok.decode(whole[:1]) == "Hello" and len(whole) == 2  # one token for "Hello" in this vocabulary
    ids, flags = _encode_spans(tok, "Hello there", [(3, 11)], add_special_tokens=False)
    assert ids == whole and flags == [False, True]  # "Hello" starts before the edge; " there" inside
    ids, flags = _encode_spans(tok, "Hello there", [(5, 11)], add_special_tokens=False)
    assert ids == whole and flags == [False, True]  # an edge between tokens: the pieces agree


def test_a_template_that_breaks_on_the_messages_is_a_data_error(tmp_path):
    tok = load_tokenizer(chatml(tmp_path / "tok", template="{{ messages[0]['content'] + 1 }}"))
    with pytest.raises(DataError, match="failed on these messages: TypeError"):
        prompt_ids(template_for(tok), tok, CONVERSATIONS[0])
