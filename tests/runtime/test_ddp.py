"""TrainStep under a process group: the trained parameters go under DDP (bucketed all-reduce,
overlapped with the backward pass), never reduced tensor by tensor, and 2 processes train exactly
what 1 process trains on the same global batch, with uneven, weighted shares per rank."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from palm_rlhf.runtime.step import TrainStep

from dist_testing import run_workers

X = torch.linspace(-1, 1, 40).reshape(10, 4)
Y = torch.linspace(0, 2, 10)
SHARES = [[0, 1, 2], [3, 4, 5, 6, 7, 8, 9]]  # rank 0: 3 rows, rank 1: 7 rows
STEPS = 3


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.unused = torch.nn.Linear(2, 2)  # requires grad, never used, not optimised: DDP must not wait for it
        self.net[0].bias.requires_grad_(False)  # frozen

    def forward(self, x):
        return self.net(x)


def _model():
    return _Net()


def _train(rows_per_step: list[list[list[int]]]) -> tuple[list[torch.Tensor], list[float], object]:
    """STEPS optimizer steps; each step's micro-batches are the given row lists (weight = row count)."""
    model = _model()
    params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("unused")]
    stepper = TrainStep(model, torch.optim.AdamW(params, lr=0.05), grad_accum=len(rows_per_step[0]),
                        clip_grad_norm=0.5)

    def loss_fn(rows):
        return ((model(X[rows]).squeeze(-1) - Y[rows]) ** 2).mean(), len(rows)

    losses = [stepper(loss_fn, micro, step=s + 1).loss for s, micro in enumerate(rows_per_step)]
    return [p.detach().clone() for p in params], losses, stepper


def _rank_train(rank: int, world: int):
    calls = []
    real = dist.all_reduce
    dist.all_reduce = lambda t, *a, **k: (calls.append(tuple(t.shape)), real(t, *a, **k))[1]
    try:
        mine = SHARES[rank]
        params, losses, stepper = _train([[mine[:1], mine[1:]]] * STEPS)  # 2 micro-batches of uneven size
    finally:
        dist.all_reduce = real
    return {"params": params, "losses": losses, "ddp": type(stepper.ddp).__name__, "python_all_reduces": calls}


@pytest.mark.slow
def test_two_processes_with_ddp_equal_one_process():
    one_params, one_losses, one_stepper = _train([[list(range(10))]] * STEPS)
    assert one_stepper.ddp is None  # no process group: a plain step
    ranks = run_workers(_rank_train, 2)
    for r in ranks:
        assert r["ddp"] == "DistributedDataParallel"
        # the only Python-level all-reduce per step is the loss/weight totals: gradients go through DDP
        assert r["python_all_reduces"] == [(2,)] * STEPS
        assert r["losses"] == pytest.approx(one_losses, abs=1e-6)
        for a, b in zip(r["params"], one_params):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not torch.equal(one_params[-1], _model().net[2].bias.detach())  # it learned
