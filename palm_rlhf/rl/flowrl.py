"""FlowRL (Zhu et al. 2025, arXiv:2509.15207): match the policy to the reward distribution instead of
maximising the reward. A learned partition function log Z(x) makes

    Z(x) * pi(y|x)^(1/|y|)  =  exp(beta * r(x, y)) * pi_ref(y|x)^(1/|y|)

a target; the squared log of the two sides (trajectory balance) is minimised for every sampled
response, weighted by the clipped sequence importance ratio pi / pi_old (no gradient):

    loss = w * (log Z(x) + (1/|y|) log pi(y|x) - beta * r_hat - (1/|y|) log pi_ref(y|x))^2,
    w = clip(exp(sum_t log pi - log pi_old), 1 - eps, 1 + eps)

r_hat is the reward z-scored within the prompt's group of samples. log Z(x) is a small network on
the prompt's mean final embedding; its gradient trains it, the policy's log-probs train the policy.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..errors import ConfigError
from .reinforce import check_group_size


def trajectory_balance_loss(log_z: Tensor, logp: Tensor, ref_logp: Tensor, old_logp: Tensor, mask: Tensor,
                            rewards: Tensor, beta: float, clip_eps: float = 0.2) -> tuple[Tensor, Tensor]:
    """Per-sequence FlowRL loss (b,) and the trajectory-balance residual (b,) (no gradient).

    log_z (b,) the partition function's output per prompt; logp (b, T) the policy's per-token
    log-probs (differentiable); ref_logp, old_logp (b, T) the reference's and the sampler's;
    mask (b, T); rewards (b,) normalised rewards (z-scored in each group); beta the inverse
    temperature of the target exp(beta * r). Log-probs are averaged over each response's real
    tokens (1/|y|; an empty response counts as length 1)."""
    if beta <= 0 or clip_eps <= 0:
        raise ConfigError(f"FlowRL beta={beta} and clip_eps={clip_eps} must be > 0")
    mask = mask.bool()
    m = mask.to(logp.dtype)
    length = m.sum(-1).clamp(min=1.0)
    mean_logp = (logp * m).sum(-1) / length
    mean_ref = (ref_logp.detach() * m).sum(-1) / length
    log_ratio = ((logp.detach() - old_logp.detach()) * m).sum(-1)
    weight = log_ratio.exp().clamp(1.0 - clip_eps, 1.0 + clip_eps)
    balance = log_z + mean_logp - beta * rewards.detach() - mean_ref
    return weight * balance ** 2, balance.detach()


class PartitionFunction(nn.Module):
    """log Z(x) from a prompt embedding (b, d) -> (b,): an MLP of `layers` hidden layers of width `hidden`
    (SiLU), its last layer initialised to output 0 (Z = 1 at the start)."""

    def __init__(self, dim: int, hidden: int = 256, layers: int = 2):
        super().__init__()
        if hidden < 1 or layers < 0:
            raise ConfigError(f"partition function hidden={hidden} must be >= 1 and layers={layers} >= 0")
        blocks, width = [], dim
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.net = nn.Sequential(*blocks)
        self.out = nn.Linear(width, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, embedding: Tensor) -> Tensor:
        return self.out(self.net(embedding.float())).squeeze(-1)


def group_zscore(scores: Tensor, group_size: int, eps: float = 1e-8) -> Tensor:
    """Each score minus its group's mean over the group's unbiased std (0 for a group with no variance).
    scores (b * G,) ordered group by group -> (b * G,)."""
    from .advantages import group_advantages
    return group_advantages(scores.float(), group_size, "std", eps=eps)[0]


@dataclass
class FlowRLHyperparams:
    """group_size: samples per prompt (rewards are z-scored in each group); beta: inverse temperature of
    the target; clip_eps: clip of the sequence importance weight."""

    group_size: int = 8
    beta: float = 15.0
    clip_eps: float = 0.2

    def __post_init__(self):
        check_group_size(self.group_size, "rewards are z-scored within a group")
        if self.beta <= 0 or self.clip_eps <= 0:
            raise ConfigError(f"beta={self.beta} and clip_eps={self.clip_eps} must be > 0")


__all__ = ["FlowRLHyperparams", "trajectory_balance_loss", "PartitionFunction", "group_zscore"]
