"""LoRA's alpha / r scale: a learning rate transfers across ranks, alpha is saved with the
scope, and adapters saved before alpha existed load with their old scale (alpha = r)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from palm_rlhf.model.checkpoint import load_adapter, save_adapter
from palm_rlhf.model.lora import DEFAULT_LORA_ALPHA, LoRA
from palm_rlhf.model.palm import PaLM
from palm_rlhf.model.reward import RewardModel
from tests.helpers.models import make_palm

X = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))


def loss_drop(r: int, legacy: bool = False, seed: int = 0, steps: int = 5, lr: float = 1e-3) -> float:
    """How much `steps` Adam steps at a fixed lr on a fresh scope of rank r lower the loss."""
    model = make_palm(dim=64, randomized=False)
    torch.manual_seed(seed)
    # legacy: the seed's LoRA (randn A, output scale 1), the only init before alpha existed
    model.add_finetune_params("s", lora_r=r, lora_alpha=None if legacy else DEFAULT_LORA_ALPHA)
    before = model(X, return_loss=True, finetune_scope="s").item()
    opt = torch.optim.Adam(model.finetune_parameters("s"), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(X, return_loss=True, finetune_scope="s").backward()
        opt.step()
    return before - model(X, return_loss=True, finetune_scope="s").item()


def test_early_update_size_is_rank_independent():
    """Measured (2 seeds averaged): new init 0.094 / 0.094 / 0.097 for r = 4 / 8 / 32;
    the old init (randn A, scale 1) 0.067 / 0.124 / 0.316, a step that grew with the rank."""
    new = {r: (loss_drop(r, seed=0) + loss_drop(r, seed=1)) / 2 for r in (4, 8, 32)}
    old = {r: (loss_drop(r, True, seed=0) + loss_drop(r, True, seed=1)) / 2 for r in (4, 8, 32)}
    assert min(new.values()) > 0.01  # the steps did lower the loss
    assert max(new.values()) / min(new.values()) < 1.25, new
    assert old[32] / old[4] > 2.5, old  # what the bounded A and alpha / r fixed


def test_fresh_scope_init_and_scale():
    lora = LoRA(100, 7, r=4, alpha=32.0)
    assert lora.scale == 8.0 and torch.count_nonzero(lora.B) == 0
    assert lora.A.abs().max() <= 0.1  # bounded: U(-1/sqrt(dim), 1/sqrt(dim))
    seed_lora = LoRA(100, 7, r=4)  # alpha=None: the seed's LoRA
    assert seed_lora.scale == 1.0 and seed_lora.A.abs().max() > 1.0
    model = make_palm()
    model.add_finetune_params("a", lora_r=4, lora_alpha=DEFAULT_LORA_ALPHA)
    model.add_finetune_params("seed", lora_r=4)  # the seed surface's default
    assert model.finetune_scope_alphas == {"a": DEFAULT_LORA_ALPHA, "seed": 4.0}
    assert model.finetune_modules["a"][0][0].scale == DEFAULT_LORA_ALPHA / 4


def _train(model, scope, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.finetune_parameters(scope):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def test_alpha_saved_with_adapter_and_pretrained(tmp_path):
    model = make_palm()
    model.add_finetune_params("sft", lora_r=4, lora_alpha=12.0)
    _train(model, "sft")
    expected = model(X, finetune_scope="sft")
    save_adapter(model, "sft", tmp_path / "a.safetensors")
    model.save_pretrained(tmp_path / "full")
    assert json.loads((tmp_path / "full" / "config.json").read_text())["finetune_scope_alphas"] == {"sft": 12.0}
    again = make_palm()
    load_adapter(again, tmp_path / "a.safetensors")
    assert again.finetune_scope_alphas == {"sft": 12.0}
    assert torch.equal(again(X, finetune_scope="sft"), expected)
    full = PaLM.from_pretrained(tmp_path / "full").eval()
    assert full.finetune_scope_alphas == {"sft": 12.0}
    assert torch.equal(full(X, finetune_scope="sft"), expected)


def test_pre_alpha_adapters_load_with_their_old_scale(tmp_path):
    """Files written before alpha existed: no `lora_alpha` in the adapter's metadata, no
    `finetune_scope_alphas` in config.json. They were trained with output scale 1."""
    model = make_palm()
    model.add_finetune_params("sft", lora_r=4, lora_alpha=4)  # scale 1, as every old scope had
    _train(model, "sft")
    expected = model(X, finetune_scope="sft")
    path = save_adapter(model, "sft", tmp_path / "a.safetensors")
    old_meta = {"scope": "sft", "lora_r": "4", "dim": str(model.dim), "depth": str(len(model.layers))}
    save_file(load_file(str(path)), str(path), metadata=old_meta)  # exactly the old writer's file
    model.save_pretrained(tmp_path / "full")
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    del config["finetune_scope_alphas"]
    (tmp_path / "full" / "config.json").write_text(json.dumps(config))

    again = make_palm()
    load_adapter(again, path)
    assert again.finetune_scope_alphas == {"sft": 4.0}
    assert torch.equal(again(X, finetune_scope="sft"), expected)
    full = PaLM.from_pretrained(tmp_path / "full").eval()
    assert torch.equal(full(X, finetune_scope="sft"), expected)


def test_pre_alpha_reward_model_loads_with_its_old_scale(tmp_path):
    rm = RewardModel(make_palm(), dropout=0.0, lora_r=4, lora_alpha=4).eval()
    _train(rm.palm, "reward")
    expected = rm(X, prompt_lengths=torch.full((4,), 6))
    rm.save_pretrained(tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["reward"]["lora_alpha"] == 4.0
    del config["reward"]["lora_alpha"]
    (tmp_path / "rm" / "config.json").write_text(json.dumps(config))
    loaded = RewardModel.from_pretrained(tmp_path / "rm").eval()
    assert loaded.palm.finetune_scope_alphas["reward"] == 4.0
    assert torch.equal(loaded(X, prompt_lengths=torch.full((4,), 6)), expected)
