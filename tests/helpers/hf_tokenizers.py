"""Tiny Hugging Face tokenizer directories built in the test (no download): a byte-level BPE trained
on a few sentences with a family's special tokens, saved as tokenizer.json + the Hugging Face
tokenizer_config.json (+ generation_config.json), readable by transformers and by us."""

from __future__ import annotations

import json
from pathlib import Path

# ChatML (Qwen-style): a default system turn; raise_exception on an unknown role or an assistant first
CHATML = (
    "{%- if messages[0]['role'] == 'assistant' %}"
    "{{ raise_exception('Conversations must start with a system or user message') }}{%- endif %}"
    "{%- if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Only system, user and assistant roles are supported, got ' + message['role']) }}"
    "{%- endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama-3-style: BOS written by the template, header tokens, trimmed content, <|eot_id|> ends a turn
LLAMA3 = (
    "{%- for message in messages %}"
    "{%- set turn = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' %}"
    "{%- if loop.first %}{%- set turn = bos_token + turn %}{%- endif %}"
    "{{ turn }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CORPUS = ["Hello there, how are you today? I am fine, thanks for asking.",
          "The quick brown fox jumps over the lazy dog. What is two plus two? Four.",
          "You are a helpful assistant. Answer briefly and kindly."] * 10


def build(directory, specials, *, template=None, post_bos=None, config=None, generation=None,
          vocab_size: int = 400) -> Path:
    """Train the tiny BPE and write the files. `post_bos`: tokenizer.json's post-processor adds this
    token (as Llama 3's does); otherwise it has a ByteLevel post-processor (as Qwen's)."""
    import tokenizers as tk

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if post_bos:
        tok.post_processor = tk.processors.TemplateProcessing(
            single=f"{post_bos} $A", pair=f"{post_bos} $A {post_bos} $B",
            special_tokens=[(post_bos, tok.token_to_id(post_bos))])
    else:
        tok.post_processor = tk.processors.ByteLevel(trim_offsets=False)
    tok.save(str(directory / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **(config or {})}
    if template is not None:
        cfg["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    if generation is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory


def chatml(directory, **kw) -> Path:
    """Qwen-like: no BOS, EOS <|im_end|>, PAD <|endoftext|>."""
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", **kw.pop("config", {})}
    return build(directory, CHATML_SPECIALS, template=kw.pop("template", CHATML), config=config, **kw)


def llama3(directory, **kw) -> Path:
    """Llama-3-like: BOS from tokenizer.json's post-processor, EOS <|end_of_text|>, and
    generation_config.json's eos_token_id [<|end_of_text|>, <|eot_id|>] = [1, 4]."""
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", **kw.pop("config", {})}
    kw.setdefault("generation", {"bos_token_id": 0, "eos_token_id": [1, 4]})
    return build(directory, LLAMA3_SPECIALS, template=kw.pop("template", LLAMA3), post_bos="<|begin_of_text|>",
                 config=config, **kw)


def reference(directory):
    """transformers' tokenizer for the directory (the reference; never used by the library)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is two plus two?"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello there"},
     {"role": "assistant", "content": "I am fine, thanks for asking."},
     {"role": "user", "content": "  How are you today?\n"}],
]
