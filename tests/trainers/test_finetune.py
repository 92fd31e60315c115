"""SFT: response-only loss, token-weighted accumulation, LoRA trains only its scope and is saved alone."""

import json

import pytest
import torch
import torch.nn.functional as F

from palm_rlhf.data.tokenizer import ByteTokenizer
from palm_rlhf.model import PaLM
from palm_rlhf.model.checkpoint import load_adapter
from palm_rlhf.runtime.config import load_config
from palm_rlhf.runtime.metrics import read_metrics
from palm_rlhf.trainers.finetune import ADAPTER_NAME, FinetuneConfig, FinetuneTrainer

NAMES = ["ann", "bob", "cy", "dora", "ed", "flo", "gus", "hal", "ivy", "jo", "kim", "lu"]


@pytest.fixture()
def base_and_data(tmp_path):
    torch.manual_seed(0)
    base = tmp_path / "base"
    PaLM(dim=32, num_tokens=256, depth=1, heads=2, dim_head=16).save_pretrained(base)
    ByteTokenizer().save(base)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"greet {n}:", "response": f" hello {n}!" + "!" * (i % 3)}) + "\n"
                            for i, n in enumerate(NAMES)))
    return base, data


def _config(tmp_path, base, data, *overrides, out="sft"):
    return load_config(FinetuneConfig, None, [
        f"out_dir={tmp_path / out}", f"model={base}", f"data={data}", "seq_len=32", "batch_size=4", "max_steps=4",
        "log_every=1", "eval.every=0", "save_every=0", "progress=false", "device=cpu", "eval.fraction=0.2",
        "optim.lr=1e-2", "optim.warmup=0", *overrides])


def _run(config):
    trainer = FinetuneTrainer(config)
    try:
        trainer.setup()
        trainer.summary = trainer.train()
        return trainer
    finally:
        trainer.cleanup()


def test_loss_counts_response_tokens_only(tmp_path, base_and_data):
    base, data = base_and_data
    trainer = FinetuneTrainer(_config(tmp_path, base, data)).setup()
    try:
        batch = trainer.micro_batches(0)[0]
        loss, weight = trainer.loss(batch)
        tokens, mask = batch
        logits = trainer.model(tokens[:, :-1])
        expected, count = 0.0, 0
        for row in range(tokens.shape[0]):  # slow reference: one target at a time, response + EOS only
            for j in range(tokens.shape[1] - 1):
                if mask[row, j]:
                    expected += F.cross_entropy(logits[row, j][None], tokens[row, j + 1][None]).item()
                    count += 1
        assert int(weight) == count and loss.item() == pytest.approx(expected / count, rel=1e-5)
    finally:
        trainer.cleanup()


def test_accumulation_weights_micro_batches_by_response_tokens(tmp_path, base_and_data):
    base, data = base_and_data
    _run(_config(tmp_path, base, data, "max_steps=2", out="big"))
    _run(_config(tmp_path, base, data, "max_steps=2", "micro_batch_size=1", out="small"))
    big = [r["train/loss"] for r in read_metrics(tmp_path / "big") if "train/loss" in r]
    small = [r["train/loss"] for r in read_metrics(tmp_path / "small") if "train/loss" in r]
    assert len(big) == 2 and small == pytest.approx(big, abs=1e-5)


def test_lora_trains_only_its_scope_and_saves_it_alone(tmp_path, base_and_data):
    base, data = base_and_data
    trainer = _run(_config(tmp_path, base, data, "lora.scope=sft", "lora.r=4", "max_steps=8", "eval.every=4"))
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "sft") if "train/loss" in r]
    assert losses[-1] < losses[0]
    original = PaLM.from_pretrained(base).state_dict()
    trained = trainer.model.state_dict()
    assert all(torch.equal(original[k], trained[k]) for k in original)  # frozen base
    final = tmp_path / "sft" / "final"
    reloaded = PaLM.from_pretrained(base)
    assert load_adapter(reloaded, final / ADAPTER_NAME) == "sft"
    merged = PaLM.from_pretrained(final)
    assert merged.finetune_scope_ranks == {}
    x = torch.randint(1, 256, (2, 12))
    torch.testing.assert_close(merged(x), reloaded(x, finetune_scope="sft"), atol=1e-5, rtol=1e-5)
    assert any("val/loss" in r for r in read_metrics(tmp_path / "sft"))


def test_masked_positions_lists_each_rows_true_columns_first():
    """Row 0 has loss at columns 1, 3; row 1 at 0, 1, 2; row 2 nowhere: T = 3, fillers not kept."""
    from palm_rlhf.ops import masked_positions

    mask = torch.tensor([[False, True, False, True], [True, True, True, False], [False] * 4])
    positions, kept = masked_positions(mask)
    assert positions[0, :2].tolist() == [1, 3] and positions[1].tolist() == [0, 1, 2]
    assert kept.tolist() == [[True, True, False], [True, True, True], [False, False, False]]


def test_sft_loss_at_assistant_positions_equals_the_full_logits_loss():
    """`FinetuneTrainer.loss` asks the model for logits at the masked (assistant) positions only; its
    loss and LoRA gradients equal the mean cross-entropy over the full (b, n, V) logits under the mask."""
    from types import SimpleNamespace

    from palm_rlhf.ops import token_cross_entropy

    torch.manual_seed(0)
    model = PaLM(dim=32, num_tokens=64, depth=2, heads=2, dim_head=16)
    model.add_finetune_params("sft", lora_r=4, lora_alpha=8.0)
    params = list(model.finetune_parameters("sft"))
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    tokens = torch.randint(1, 64, (3, 12))
    mask = torch.zeros(3, 11, dtype=torch.bool)
    mask[0, 4:9], mask[1, 7:], mask[2, 2:5] = True, True, True  # prompts, then replies (row 1 to the end)

    def grads(loss):
        return [g.clone() for g in torch.autograd.grad(loss, params)]

    full = token_cross_entropy(model(tokens[:, :-1], finetune_scope="sft"), tokens[:, 1:], mask)
    loss, count = FinetuneTrainer.loss(SimpleNamespace(forward_module=model, scope="sft"), (tokens, mask))
    assert int(count) == 12
    torch.testing.assert_close(loss, full, atol=1e-6, rtol=1e-5)
    for a, b in zip(grads(loss), grads(full)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
