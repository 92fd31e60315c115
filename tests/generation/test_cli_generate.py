"""`palm-rlhf generate` end to end on a tiny checkpoint."""

from __future__ import annotations

import pytest
import torch

from palm_rlhf.cli.main import main
from palm_rlhf.model import PaLM


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt")
    PaLM(dim=32, num_tokens=256, depth=1, heads=2, dim_head=16).save_pretrained(path)
    return path


def run_cli(capsys, *argv):
    code = main(["generate", *map(str, argv)])
    return code, capsys.readouterr()


def test_stream_prints_the_same_text_as_batch_generation(checkpoint, capsys):
    args = (checkpoint, "--prompt", "ROMEO:", "--max-new-tokens", 12, "--seed", 3, "--no-eos")
    code, plain = run_cli(capsys, *args)
    assert code == 0 and plain.out.startswith("ROMEO:")
    code, streamed = run_cli(capsys, *args, "--stream")
    assert code == 0 and streamed.out == plain.out


def test_num_samples_prints_one_block_per_sample(checkpoint, capsys):
    code, res = run_cli(capsys, checkpoint, "--prompt", "Hi", "--max-new-tokens", 4, "--num-samples", 3,
                        "--top-k", 5, "--seed", 0)
    assert code == 0 and res.out.count("--- sample") == 3


@pytest.mark.parametrize("argv, message", [
    (("--top-p", "0"), "--top-p"),
    (("--max-new-tokens", "0"), "--max-new-tokens"),
    (("--stream", "--num-samples", "2"), "--stream"),
])
def test_bad_options_exit_2_naming_the_flag(checkpoint, capsys, argv, message):
    code, res = run_cli(capsys, checkpoint, "--prompt", "x", *argv)
    assert code == 2 and message in res.err


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    code, res = run_cli(capsys, tmp_path / "nope", "--prompt", "x")
    assert code == 2 and "save_pretrained" in res.err


def test_unreadable_saved_tokenizer_is_an_error_not_bytes(tmp_path, capsys):
    """Only a missing tokenizer falls back to bytes; a saved one that cannot be read exits 2."""
    torch.manual_seed(0)
    PaLM(dim=32, num_tokens=256, depth=1, heads=2, dim_head=16).save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    code, res = run_cli(capsys, tmp_path, "--prompt", "x", "--max-new-tokens", 2)
    assert code == 2 and "unreadable tokenizer config" in res.err


def test_prompt_understands_backslash_escapes_like_stop(checkpoint, capsys):
    code, res = run_cli(capsys, checkpoint, "--prompt", "Q:\\nA:", "--max-new-tokens", 3, "--temperature", 0,
                        "--no-eos")
    assert code == 0 and res.out.startswith("Q:\nA:")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A base model, and a run whose final/ holds the base with an 'actor' adapter merged + the adapter alone
    (what a LoRA SFT / PPO / GRPO / DPO run writes)."""
    import copy

    from palm_rlhf.data.tokenizer import ByteTokenizer
    from palm_rlhf.model.checkpoint import save_adapter

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    base = PaLM(dim=32, num_tokens=256, depth=1, heads=2, dim_head=16)
    base.save_pretrained(root / "base")
    base.add_finetune_params("actor", lora_r=4)
    with torch.no_grad():
        for p in base.finetune_parameters("actor"):
            p.normal_(std=0.3)
    merged = copy.deepcopy(base)
    merged.merge_finetune_params("actor")  # folds the scope in and drops it
    final = root / "run" / "final"
    merged.save_pretrained(final)
    ByteTokenizer().save(final)
    save_adapter(base, "actor", final / "adapter.safetensors")
    return root


def test_generate_takes_a_run_directory(lora_run, capsys):
    args = ("--prompt", "Hello", "--max-new-tokens", 8, "--temperature", 0, "--no-eos")
    code, from_run = run_cli(capsys, lora_run / "run", *args)
    assert code == 0
    code, from_final = run_cli(capsys, lora_run / "run" / "final", *args)
    assert code == 0 and from_run.out == from_final.out


def test_adapter_on_the_base_equals_the_merged_final(lora_run, capsys):
    args = ("--prompt", "Hello", "--max-new-tokens", 8, "--temperature", 0, "--no-eos")
    code, merged = run_cli(capsys, lora_run / "run", *args)
    assert code == 0
    code, plain = run_cli(capsys, lora_run / "base", *args)
    assert code == 0 and plain.out != merged.out  # the adapter changes the greedy text
    for adapter in (lora_run / "run" / "final" / "adapter.safetensors", lora_run / "run"):
        code, applied = run_cli(capsys, lora_run / "base", "--adapter", adapter, *args)
        assert code == 0 and applied.out == merged.out


def test_adapter_already_merged_is_refused(lora_run, capsys):
    code, res = run_cli(capsys, lora_run / "run", "--adapter", lora_run / "run" / "final" / "adapter.safetensors",
                        "--prompt", "x")
    assert code == 2 and "already has this adapter merged in" in res.err


def test_scope_on_a_merged_final_gives_cli_advice(lora_run, capsys):
    """issue 14: `generate runs/sft/final --scope sft` answered with Python advice (add_finetune_params)."""
    code, res = run_cli(capsys, lora_run / "run" / "final", "--scope", "actor", "--prompt", "x")
    assert code == 2
    assert "add_finetune_params" not in res.err and "drop --scope" in res.err and "--adapter" in res.err
    assert res.err.count("\n") == 1
