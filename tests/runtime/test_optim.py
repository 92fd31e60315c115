"""Decay groups, the warmup+cosine schedule and Lion, against hand-computed numbers."""

import copy

import pytest
import torch
from torch import nn

from palm_rlhf.errors import ConfigError
from palm_rlhf.runtime.optim import Lion, OptimConfig, build_optimizer, build_scheduler, param_groups, warmup_cosine


def test_warmup_cosine_by_hand():
    """warmup 2, max 6, min 0.1: 0.5, 1.0, then 0.1 + 0.9 * (1 + cos(pi * t)) / 2 for t = 0, 1/3, 2/3, 1
    = 1.0, 0.775, 0.325, 0.1."""
    got = [warmup_cosine(s, 2, 6, 0.1) for s in range(6)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.775, 0.325, 0.1])
    assert warmup_cosine(100, 2, 6, 0.1) == pytest.approx(0.1)  # stays at the floor past max_steps


def _lrs(config: OptimConfig, steps: int = 6) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = build_optimizer([("w", p)], config)
    sched = build_scheduler(opt, config, max_steps=steps)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_scheduler_follows_the_multiplier():
    assert _lrs(OptimConfig(lr=1.0, warmup=2, min_lr_ratio=0.1)) == pytest.approx([0.5, 1.0, 1.0, 0.775, 0.325, 0.1])
    # schedule=constant: the same warmup, then the peak lr (what PPO and GRPO default to)
    assert _lrs(OptimConfig(lr=1.0, warmup=2, schedule="constant")) == pytest.approx([0.5, 1, 1, 1, 1, 1])
    # the old spellings still build the same optimizer (one deprecation line each)
    assert OptimConfig(lr=1.0, warmup_steps=2, clip_grad_norm=0.5, beta2=0.99) == OptimConfig(
        lr=1.0, warmup=2, max_grad_norm=0.5, betas=(0.9, 0.99))


def test_per_parameter_learning_rates_and_betas_reach_the_optimizer():
    """lr_of gives PPO's critic its own lr; optim.betas is what AdamW and Lion use."""
    actor, critic = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(3))
    config = OptimConfig(lr=0.1, betas=(0.8, 0.9), weight_decay=0.0)
    opt = build_optimizer([("a", actor), ("c", critic)], config, lr_of=lambda n, p: 0.5 if n == "c" else None)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_param[id(actor)]["lr"] == 0.1 and by_param[id(critic)]["lr"] == 0.5
    assert {g["betas"] for g in opt.param_groups} == {(0.8, 0.9)}
    lion = build_optimizer([("a", actor)], OptimConfig(name="lion", lr=0.1, betas=(0.7, 0.6)))
    assert lion.param_groups[0]["betas"] == (0.7, 0.6)


def test_decay_only_on_matrices():
    lin, norm = torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)
    frozen = torch.nn.Parameter(torch.zeros(5, 5), requires_grad=False)
    named = list(lin.named_parameters()) + list(norm.named_parameters()) + [("frozen", frozen)]
    decay, no_decay = param_groups(named, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0  # bias, norm weight, norm bias


def test_lion_step_by_hand():
    """m0 = 0, g = (0.5, -2), beta1 0.9: update = sign(0.1 g) = (1, -1); lr 0.1, wd 0.5:
    p = (1, 1) * (1 - 0.05) - 0.1 * (1, -1) = (0.85, 1.05); m = 0.01 * g = (0.005, -0.02)."""
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    p.grad = torch.tensor([0.5, -2.0])
    opt.step()
    assert p.detach().tolist() == pytest.approx([0.85, 1.05])
    assert opt.state[p]["exp_avg"].tolist() == pytest.approx([0.005, -0.02])


def test_optim_config_validation():
    with pytest.raises(ConfigError, match="optim.lr"):
        OptimConfig(lr=0)
    with pytest.raises(ConfigError, match=r"optim.betas=\[0.9, 1.0\]"):
        OptimConfig(betas=(0.9, 1.0))
    with pytest.raises(ConfigError, match="optim.schedule='linear': use one of cosine, constant"):
        OptimConfig(schedule="linear")
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer([("w", torch.nn.Parameter(torch.zeros(2), requires_grad=False))], OptimConfig())


def test_adamw_is_fused_on_cpu_and_steps_like_the_reference_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    reference = copy.deepcopy(model)
    config = OptimConfig(lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(model, config)
    assert all(g["fused"] for g in fused.param_groups)
    plain = torch.optim.AdamW(param_groups(reference.named_parameters(), config.weight_decay), lr=config.lr,
                              betas=config.betas, eps=config.eps)
    for _ in range(3):
        x = torch.randn(5, 8)
        for m, opt in ((model, fused), (reference, plain)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
