"""Chat-format data through the trainers, on a model directory holding a Hugging Face tokenizer and
its Jinja (ChatML) template: SFT trains on the assistant turns only and final/ carries the
tokenizer files unchanged; DPO trains on TRL's conversational pairs."""

import json

import pytest
import torch

from tests.helpers.hf_tokenizers import chatml

from palm_rlhf.data.chat import encode_conversation, template_for  # noqa: E402
from palm_rlhf.data.tokenizer import load_tokenizer  # noqa: E402
from palm_rlhf.model import PaLM  # noqa: E402
from palm_rlhf.runtime.config import load_config  # noqa: E402
from palm_rlhf.trainers.dpo import DPOConfig, DPOTrainer  # noqa: E402
from palm_rlhf.trainers.finetune import FinetuneConfig, FinetuneTrainer  # noqa: E402

CHATS = [[{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": f"{a + b}."}]
         for a in range(4) for b in range(3)]


@pytest.fixture()
def hf_model(tmp_path):
    directory = chatml(tmp_path / "base")
    torch.manual_seed(0)
    PaLM(dim=32, num_tokens=load_tokenizer(directory).vocab_size, depth=1, heads=2,
         dim_head=16).save_pretrained(directory)
    return directory


def test_sft_on_chat_data_masks_assistant_turns_and_keeps_the_tokenizer(tmp_path, hf_model):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    config = load_config(FinetuneConfig, None, [
        f"out_dir={tmp_path / 'sft'}", f"model={hf_model}", f"data={data}", "seq_len=64", "batch_size=4",
        "max_steps=2", "log_every=1", "eval_every=0", "save_every=0", "progress=false", "device=cpu",
        "val_fraction=0", "optim.lr=1e-2", "optim.warmup_steps=0"])
    trainer = FinetuneTrainer(config)
    try:
        trainer.setup()
        tok = trainer.tokenizer
        tokens, mask = trainer.micro_batches(0)[0]
        for row in range(tokens.shape[0]):
            ids = [t for t in tokens[row].tolist()]
            targets = [ids[j + 1] for j in range(len(ids) - 1) if mask[row, j]]
            answer = tok.decode(targets)  # exactly the assistant's reply and its end of turn
            assert answer.endswith(".<|im_end|>\n") and answer[:-len(".<|im_end|>\n")].isdigit()
        trainer.summary = trainer.train()
    finally:
        trainer.cleanup()
    final = tmp_path / "sft" / "final"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (final / name).read_bytes() == (hf_model / name).read_bytes()
    tok = load_tokenizer(final)
    assert encode_conversation(template_for(tok), tok, CHATS[0]) == \
        encode_conversation(template_for(load_tokenizer(hf_model)), load_tokenizer(hf_model), CHATS[0])


def test_dpo_on_conversational_pairs(tmp_path, hf_model):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": m[:1], "chosen": m[1:], "rejected": "I do not know."}) + "\n"
                            for m in CHATS))
    config = DPOConfig(out_dir=str(tmp_path / "dpo"), model=str(hf_model), data=str(data), max_steps=2,
                       batch_size=4, max_len=48, heldout_fraction=0.25, kl_samples=2, kl_max_new_tokens=4)
    trainer = DPOTrainer(config)
    try:
        trainer.setup()
        start = trainer.evaluate(trainer.train_records)
        assert start["reward_margin"] == 0.0  # the LoRA actor starts as the reference
        kl = trainer.measure_kl()  # completions of the held-out chat prompts, stopped at <|im_end|>
        assert kl is not None and abs(kl.mean) < 1e-4
        trainer.train()
        after = trainer.evaluate(trainer.train_records)
    finally:
        trainer.cleanup()
    # two steps on the rendered pairs move the implicit reward of the chosen replies up
    assert after["reward_margin"] > 0 and after["reward_accuracy"] > 0.5
