"""TrainStep: micro-batch x accumulation == one big batch; token-weighted means; non-finite losses."""

import copy

import pytest
import torch

from palm_rlhf.errors import ConfigError, TrainingError
from palm_rlhf.runtime.optim import OptimConfig, build_optimizer
from palm_rlhf.runtime.step import TrainStep


def _setup(grad_accum, clip=0.0):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1))
    return model, TrainStep(model, opt, grad_accum=grad_accum, clip_grad_norm=clip)


def _mse(model):
    return lambda b: ((model(b[0]).squeeze(-1) - b[1]) ** 2).mean()


def test_accumulation_equals_one_big_batch():
    x, y = torch.randn(8, 4), torch.randn(8)
    big, step_big = _setup(1, clip=0.5)
    small, step_small = _setup(4, clip=0.5)
    for s in range(3):
        r_big = step_big(_mse(big), [(x, y)], step=s)
        r_small = step_small(_mse(small), [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)], step=s)
        assert r_small.loss == pytest.approx(r_big.loss, abs=1e-6)
        assert r_small.grad_norm == pytest.approx(r_big.grad_norm, abs=1e-5)
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_weighted_micro_batches_equal_the_token_mean():
    """Micro-batches of 1 and 3 valid rows: weighting by the row count gives the mean over all 4 rows
    (0.25 * l1 + 0.75 * l234), not the mean of the two means (0.5 * l1 + 0.5 * l234)."""
    x, y = torch.randn(4, 4), torch.randn(4)
    ref, step_ref = _setup(1)
    acc, step_acc = _setup(2)
    step_ref(_mse(ref), [(x, y)], step=0)
    loss_fn = _mse(acc)
    res = step_acc(lambda b: (loss_fn(b), len(b[1])), [(x[:1], y[:1]), (x[1:], y[1:])], step=0)
    assert res.weight == 4.0
    for a, b in zip(ref.parameters(), acc.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_nan_loss_raises_naming_the_step_and_leaves_weights():
    model, stepper = _setup(1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TrainingError, match="step 7: loss is nan"):
        stepper(lambda b: model(b).sum() * float("nan"), [torch.randn(2, 4)], step=7)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


def test_bad_arguments():
    model, stepper = _setup(2)
    with pytest.raises(TrainingError, match="expected grad_accum=2"):
        stepper(_mse(model), [(torch.randn(2, 4), torch.randn(2))], step=0)
    with pytest.raises(ConfigError, match="fp16 needs a CUDA"):
        TrainStep(model, stepper.optimizer, precision="fp16", device="cpu")
    with pytest.raises(ConfigError, match="precision"):
        TrainStep(model, stepper.optimizer, precision="int8")


def test_bf16_autocast_trains_on_cpu():
    model, _ = _setup(1)
    stepper = TrainStep(model, build_optimizer(model, OptimConfig(lr=1e-2)), precision="bf16")
    x, y = torch.randn(16, 4), torch.randn(16)
    losses = [stepper(_mse(model), [(x, y)], step=s).loss for s in range(20)]
    assert losses[-1] < losses[0]
