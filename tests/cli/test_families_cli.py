"""A Llama-family checkpoint through the installed CLI, as a user would bring one: a directory built
by transformers (config.json, model.safetensors, tokenizer.json, tokenizer_config.json with a
Llama-3-style chat template, generation_config.json).

generate's greedy text equals transformers' generate; LoRA SFT on chat data runs on it; export
writes a checkpoint transformers loads with the same logits, and --adapter-only a peft adapter
that reproduces the run's model on the original checkpoint; a PaLM model is refused in one line.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.families import make_hf_checkpoint
from tests.helpers.processes import palm_rlhf_cli as cli
from tests.helpers.hf_tokenizers import llama3

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Llama checkpoint directory with its tokenizer and chat template (vocabulary 400)."""
    directory = tmp_path_factory.mktemp("llama-ckpt")
    llama3(directory)
    make_hf_checkpoint("llama", directory, vocab=400, bos_token_id=0, eos_token_id=[1, 4], pad_token_id=None)
    return directory


def test_generate_greedy_equals_transformers(checkpoint):
    tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
    ref = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    prompt = "The quick brown fox"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        res = ref.generate(ids, max_new_tokens=16, do_sample=False, output_scores=True, return_dict_in_generate=True)
    new = res.sequences[0, ids.shape[1]:].tolist()
    margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in res.scores]
    keep = next((i for i, m in enumerate(margins) if m <= 1e-3), len(new))  # up to the first near tie
    assert keep >= 4, "the test model's logits are too flat to compare"
    out = cli("generate", checkpoint, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "16")
    expected = prompt + tok.decode(new[:keep])
    assert out.stdout.rstrip("\n").startswith(expected)

    info = cli("info", checkpoint).stdout
    assert "llama" in info


def test_lora_sft_on_chat_data_then_export_to_transformers_and_peft(checkpoint, tmp_path):
    peft = pytest.importorskip("peft")
    data = tmp_path / "chat.jsonl"
    with open(data, "w") as f:
        for i in range(12):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is two plus {i}?"},
                                             {"role": "assistant", "content": f"It is {i + 2}."}]}) + "\n")
    run = tmp_path / "sft"
    cli("finetune", "--config", "lora", f"model={checkpoint}", f"data={data}", f"out_dir={run}", "max_steps=3",
        "--no-progress")
    cli("export", run, tmp_path / "hf")
    cli("export", run, tmp_path / "adapter", "--adapter-only")

    from palm_rlhf import load_model

    ours = load_model(run)
    x = torch.randint(0, 400, (1, 24), generator=torch.Generator().manual_seed(0))
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = ours(x)
        assert (loaded.eval()(x).logits - expected).abs().max().item() < 1e-4
        assert (adapted(x).logits - expected).abs().max().item() < 1e-4
        assert (base(x).logits - expected).abs().max().item() > 1e-6  # the run changed the model
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")  # the tokenizer came along
    assert tok("Hello there")["input_ids"] == transformers.AutoTokenizer.from_pretrained(checkpoint)("Hello there")[
        "input_ids"]
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == [1, 4]


def test_export_refuses_a_palm_model_in_one_line(tmp_path):
    from palm_rlhf import PaLM

    PaLM(dim=16, num_tokens=256, depth=1, heads=2, dim_head=8).save_pretrained(tmp_path / "palm")
    out = cli("export", tmp_path / "palm", tmp_path / "out", check=False)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "no transformers class" in lines[0]
