"""LoRA finetune scopes: identity at creation, merge == unmerged, parameter
bookkeeping, helpful errors, and adapters saved alone as small files."""

from __future__ import annotations

import pytest
import torch

from palm_rlhf.errors import CheckpointError, ConfigError
from palm_rlhf.model.checkpoint import load_adapter, save_adapter
from tests.helpers.models import make_palm

X = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(0))


def train_scope(model, scope, std=0.05, seed=1):
    """Give a scope non-zero B (a fresh one is an exact no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.finetune_parameters(scope):
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def test_fresh_scope_is_identity():
    model = make_palm()
    before = model(X)
    model.add_finetune_params("sft")
    assert torch.equal(model(X, finetune_scope="sft"), before)  # B == 0 exactly


def test_merged_equals_unmerged():
    model = make_palm()
    model.add_finetune_params("sft", lora_r=4)
    train_scope(model, "sft")
    unmerged = model(X, finetune_scope="sft")
    assert (unmerged - model(X)).abs().max() > 0.1
    model.merge_finetune_params("sft")
    assert "sft" not in model.finetune_modules and "sft" not in model.finetune_scope_ranks
    assert (model(X) - unmerged).abs().max() <= 1e-5


def test_parameter_groups():
    model = make_palm()
    base = {id(p) for p in model.parameters()}
    model.add_finetune_params("actor")
    model.add_finetune_params("critic", lora_r=2)
    palm_ids = {id(p) for p in model.palm_parameters()}
    actor = list(model.finetune_parameters("actor"))
    critic = list(model.finetune_parameters("critic"))
    assert palm_ids == base  # LoRA weights never count as base weights
    assert {id(p) for p in actor}.isdisjoint(palm_ids | {id(p) for p in critic})
    # 2 layers x (q, k, v, o) x (A, B)
    assert len(actor) == len(critic) == 2 * 4 * 2
    assert all(p.shape[-1] == 2 or p.shape[0] == 2 for p in critic)  # rank 2 in every factor
    assert model.finetune_scope_ranks == {"actor": 8, "critic": 2}


def test_scope_errors_list_existing_scopes():
    model = make_palm()
    model.add_finetune_params("actor")
    model.add_finetune_params("critic")
    with pytest.raises(ConfigError, match=r"already exists.*'actor', 'critic'"):
        model.add_finetune_params("actor")
    for call in (lambda: model(X, finetune_scope="actr"), lambda: model.finetune_parameters("actr"),
                 lambda: model.remove_finetune_params("actr"), lambda: model.merge_finetune_params("actr")):
        with pytest.raises(ConfigError, match=r"unknown finetune scope 'actr'; scopes that exist: 'actor', 'critic'"):
            call()


def test_adapter_saved_alone_and_loaded(tmp_path):
    model = make_palm(num_tokens=512, dim=64)
    model.add_finetune_params("sft", lora_r=4)
    train_scope(model, "sft")
    x = X % 512
    expected = model(x, finetune_scope="sft")
    path = save_adapter(model, "sft", tmp_path / "sft.safetensors")
    model.save_pretrained(tmp_path / "full")
    assert path.stat().st_size * 10 < (tmp_path / "full" / "model.safetensors").stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    base = make_palm(num_tokens=512, dim=64)  # same seed: the same base weights, no scope
    assert load_adapter(base, path) == "sft"
    assert base.finetune_scope_ranks == {"sft": 4}
    assert torch.equal(base(x, finetune_scope="sft"), expected)
    assert load_adapter(base, path, scope="copy") == "copy"  # under another name
    assert torch.equal(base(x, finetune_scope="copy"), expected)


def test_adapter_errors(tmp_path):
    model = make_palm()
    model.add_finetune_params("sft")
    path = save_adapter(model, "sft", tmp_path / "a.safetensors")
    other = make_palm(dim=48)  # a different base: shapes cannot match
    with pytest.raises(CheckpointError, match=r"a\.safetensors.*wrong shapes"):
        load_adapter(other, path)
    assert "sft" not in other.finetune_modules  # a failed load leaves no half-made scope
    with pytest.raises(CheckpointError, match="no such adapter file"):
        load_adapter(model, tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="unknown finetune scope"):
        save_adapter(model, "nope", tmp_path / "b.safetensors")
