"""RewardModel: PaLM embeddings pooled into a scalar reward (or rating-bin logits).

Seed-compatible constructor, `forward` signature and parameter names (``palm.*``,
``prompt_embed``, ``response_embed``, ``to_pred.*``), so palm_rlhf_pytorch reward
checkpoints load unchanged. Behaviour fixed on purpose (see docs/reward.md):

* binned inference returns the *expected* rating ``sum_k softmax(logits)_k * k``, a
  deterministic number, unless ``sample_from_bins=True`` is asked for explicitly (the seed
  sampled a random bin by default, so the same response got different rewards);
* ``pooling='response_mean'`` (default) averages the response tokens only, ``'last'`` takes the
  last non-pad token, ``'response_mean_last'`` adds the two, ``'mean'`` is the seed's mean over
  prompt *and* response; ``'sequence_classification'`` is transformers' ``*ForSequenceClassification``
  head as TRL's RewardTrainer trains it: the linear head on the last non-pad token, and the model
  sees the token ids only (no prompt/response embeddings are added);
* leading padding is moved out of the way before the forward, so a left-padded row scores what
  the same row right-padded scores (a causal model never lets a real token see trailing padding);
* the caller's PaLM is deep-copied before dropout is set or a LoRA scope is added, so the
  model passed in is never modified.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError, InputError
from ..ops import eval_mode, gumbel_sample, masked_mean
from ..files import load_state_dict_file
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, build_palm, load_into, palm_config, read_config, write_pretrained
from .palm import PaLM
from .adapters import adapter_on_frozen_base

POOLINGS = ("response_mean", "last", "response_mean_last", "mean", "sequence_classification")
# poolings that read one position, the last real token of each row
_LAST_TOKEN = ("last", "sequence_classification")


class _SqueezeLast(nn.Module):
    """(..., 1) -> (...); parameter-free, keeps the seed's `to_pred.0.weight` key."""

    def forward(self, x: Tensor) -> Tensor:
        return x.squeeze(-1)


def pack_prompt_response(prompts: Sequence[Tensor], responses: Sequence[Tensor], pad_id: int = 0,
                         max_len: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad (prompt + response) rows into one batch.

    Returns x (b, n) long, mask (b, n) bool (True = real token) and prompt_lengths (b,).
    Rows longer than `max_len` lose prompt tokens from the left first (the response is what is
    judged); a response longer than `max_len` alone keeps its first `max_len` tokens.
    """
    if len(prompts) != len(responses) or not prompts:
        raise InputError(f"need the same, non-zero number of prompts and responses; got {len(prompts)} "
                         f"and {len(responses)}")
    rows, plens = [], []
    for p, r in zip(prompts, responses):
        p, r = torch.as_tensor(p, dtype=torch.long).flatten(), torch.as_tensor(r, dtype=torch.long).flatten()
        if max_len is not None and p.numel() + r.numel() > max_len:
            r = r[:max_len]
            p = p[p.numel() - (max_len - r.numel()):] if max_len > r.numel() else p[:0]
        if p.numel() + r.numel() == 0:
            raise InputError("a (prompt, response) pair is empty; give at least one token")
        rows.append(torch.cat([p, r]))
        plens.append(p.numel())
    n = max(row.numel() for row in rows)
    x = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, row in enumerate(rows):
        x[i, : row.numel()] = row
        mask[i, : row.numel()] = True
    return x, mask, torch.tensor(plens, dtype=torch.long)


def _drop_leading_padding(x: Tensor, mask: Tensor, prompt_mask: Tensor | None
                          ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Shift each row left by its number of leading pads (mask False before the first real token),
    so every row starts at column 0 and its padding trails it, where causal attention never reads
    it. Rows that start with a real token (right padding) are unchanged; so are all rows when
    none has leading padding (no copy)."""
    n = x.shape[1]
    lead = torch.where(mask.any(-1), mask.long().argmax(-1), 0)  # (b,) index of the first real token
    if not bool(lead.any()):
        return x, mask, prompt_mask
    cols = torch.arange(n, device=x.device)[None, :]  # (1, n)
    src = cols + lead[:, None]  # (b, n) column j reads column j + lead
    inside = src < n
    src = src.clamp(max=n - 1)
    x = x.gather(1, src)
    mask = mask.gather(1, src) & inside
    if prompt_mask is not None:
        prompt_mask = prompt_mask.bool().gather(1, src) & inside
    return x, mask, prompt_mask


class RewardModel(nn.Module):
    def __init__(self, palm: PaLM, dropout: float = 0.1, num_binned_output: float = 0.0, use_lora: bool = True,
                 lora_r: int = 8, reward_lora_scope: str = "reward", sample_from_bins: bool | None = None,
                 sample_temperature: float = 1.0, *, pooling: str = "response_mean",
                 lora_alpha: float | None = None, lora_options: dict | None = None):
        super().__init__()
        if not isinstance(palm, PaLM):
            raise ConfigError(f"RewardModel(palm=...) needs a palm_rlhf PaLM, got {type(palm).__name__}")
        if pooling not in POOLINGS:
            raise ConfigError(f"RewardModel(pooling={pooling!r}): use one of {', '.join(POOLINGS)}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"RewardModel(dropout={dropout!r}): dropout must be in [0, 1)")
        if not float(sample_temperature) > 0:
            raise ConfigError(f"RewardModel(sample_temperature={sample_temperature!r}) must be > 0")
        self.binned_output = num_binned_output > 1
        if sample_from_bins and not self.binned_output:
            raise ConfigError("RewardModel(sample_from_bins=True) needs num_binned_output > 1")

        # never touch the caller's model: dropout and the LoRA scope go on a private copy
        self.palm = copy.deepcopy(palm)
        self.palm.set_dropout(dropout)
        self.reward_lora_scope = reward_lora_scope if use_lora else None
        lora_options = dict(lora_options or {})
        if self.reward_lora_scope is not None:  # the adapter trains on a frozen base
            adapter_on_frozen_base(self.palm, reward_lora_scope, r=lora_r, alpha=lora_alpha, **lora_options)
        lora_alpha = self.palm.finetune_scope_alphas.get(reward_lora_scope, lora_alpha)

        dim = palm.dim
        self.prompt_embed = nn.Parameter(torch.zeros(1, 1, dim))
        self.response_embed = nn.Parameter(torch.zeros(1, 1, dim))
        if self.binned_output:
            self.to_pred = nn.Linear(dim, int(num_binned_output))
        else:
            self.to_pred = nn.Sequential(nn.Linear(dim, 1, bias=False), _SqueezeLast())

        self.sample_from_bins = bool(sample_from_bins)  # the seed defaulted to True for binned heads
        self.sample_temperature = float(sample_temperature)
        self.pooling = pooling
        self.reward_config = dict(dropout=float(dropout), num_binned_output=int(num_binned_output) if
                                  self.binned_output else 0, use_lora=bool(use_lora), lora_r=int(lora_r),
                                  reward_lora_scope=reward_lora_scope, sample_from_bins=self.sample_from_bins,
                                  sample_temperature=self.sample_temperature, pooling=pooling,
                                  lora_alpha=None if lora_alpha is None else float(lora_alpha))
        if lora_options:  # e.g. targets: what from_pretrained needs to rebuild the same scope
            self.reward_config["lora_options"] = {k: list(v) if isinstance(v, tuple) else v
                                                  for k, v in lora_options.items()}

    # ------------------------------------------------------------------ seed utilities

    def load(self, path) -> "RewardModel":
        """Load a state dict saved by the seed (`torch.save(reward_model.state_dict())`) or by us."""
        load_into(self, load_state_dict_file(Path(path)), source=str(path))
        return self

    def finetune_parameters(self) -> list[nn.Parameter]:
        """The head, the prompt/response embeddings, and the LoRA scope (or the whole PaLM without LoRA).

        (The seed left out prompt_embed/response_embed, so they never trained. Under
        ``pooling='sequence_classification'`` they are not used, so they are not listed.)
        """
        body = (self.palm.finetune_parameters(self.reward_lora_scope) if self.reward_lora_scope is not None
                else self.palm.parameters())
        segments = [] if self.pooling == "sequence_classification" else [self.prompt_embed, self.response_embed]
        return [*self.to_pred.parameters(), *segments, *body]

    # ------------------------------------------------------------------ forward

    def _prompt_mask(self, x: Tensor, prompt_mask: Tensor | None, prompt_lengths: Tensor | None) -> Tensor | None:
        if prompt_mask is not None and prompt_lengths is not None:
            raise InputError("pass prompt_mask or prompt_lengths, not both")
        if prompt_lengths is not None:
            positions = torch.arange(x.shape[1], device=x.device)
            return positions[None, :] < prompt_lengths.to(x.device)[:, None]  # (b, n)
        return None if prompt_mask is None else prompt_mask.bool()

    def _pooled_positions(self, x: Tensor, mask: Tensor | None, prompt_mask: Tensor | None
                          ) -> tuple[Tensor | None, Tensor]:
        """Which positions the pooling reads: (positions (b, T), or None for all n, and the
        (b, T) or (b, n) mask of those that count). Only these are computed in the last
        block (`PaLM.embed(positions=...)`)."""
        b, n = x.shape
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=x.device)
        mask = mask.bool()
        if self.pooling == "mean":
            return None, mask
        if self.pooling in _LAST_TOKEN:
            # index of the last real token; argmax picks the first maximum, so weight by position
            last = (mask.long() * torch.arange(1, n + 1, device=x.device)).argmax(dim=1)  # (b,)
            return last[:, None], torch.ones(b, 1, dtype=torch.bool, device=x.device)
        keep = mask if prompt_mask is None else mask & ~prompt_mask  # response_mean
        counts = keep.sum(-1)
        width = max(int(counts.max()), 1)
        positions = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :width]  # kept ones first
        valid = torch.arange(width, device=x.device)[None, :] < counts[:, None]
        return positions, valid

    def head(self, x: Tensor, mask: Tensor | None = None, prompt_mask: Tensor | None = None,
             prompt_lengths: Tensor | None = None, disable_lora: bool = False) -> Tensor:
        """Raw head output: rewards (b,) or bin logits (b, K).

        A row may be padded on either side: its leading padding (mask False before its first real
        token) is moved to its end before the forward, and `prompt_lengths` count from the first
        real token."""
        if mask is not None and mask.shape != x.shape:
            raise InputError(f"mask {tuple(mask.shape)} must match x {tuple(x.shape)}")
        if prompt_mask is not None and prompt_mask.shape != x.shape:
            raise InputError(f"prompt_mask {tuple(prompt_mask.shape)} must match x {tuple(x.shape)}")
        if mask is not None and self.palm.causal:
            x, mask, prompt_mask = _drop_leading_padding(x, mask.bool(), prompt_mask)
        prompt_mask = self._prompt_mask(x, prompt_mask, prompt_lengths)
        extra_embed = None
        if prompt_mask is not None and self.pooling != "sequence_classification":
            # tell the model which tokens are prompt and which are response
            extra_embed = torch.where(prompt_mask[..., None], self.prompt_embed, self.response_embed)  # (b, n, d)
        positions, counted = self._pooled_positions(x, mask, prompt_mask)
        embeds = self.palm.embed(x, finetune_scope=self.reward_lora_scope, disable_lora=disable_lora,
                                 extra_embed=extra_embed, positions=positions)
        pooled = masked_mean(embeds, counted[..., None], dim=1)  # an empty response: zeros, the head's bias
        if self.pooling == "response_mean_last":  # plus the last kept position (kept ones come first)
            last = (counted.sum(-1) - 1).clamp(min=0)[:, None, None].expand(-1, 1, embeds.shape[-1])
            pooled = pooled + embeds.gather(1, last).squeeze(1) * counted.any(-1)[:, None]
        return self.to_pred(pooled)

    def expected_rating(self, bin_logits: Tensor) -> Tensor:
        """sum_k softmax(logits)_k * k: bin k stands for rating k. (b, K) -> (b,)."""
        values = torch.arange(bin_logits.shape[-1], device=bin_logits.device, dtype=torch.float32)
        return bin_logits.float().softmax(dim=-1) @ values

    def forward(self, x: Tensor, mask: Tensor | None = None, prompt_mask: Tensor | None = None,
                prompt_lengths: Tensor | None = None, labels: Tensor | None = None,
                disable_lora: bool = False) -> Tensor:
        """Without labels: rewards (b,). With labels: MSE (scalar head) or cross-entropy (binned head)."""
        pred = self.head(x, mask, prompt_mask, prompt_lengths, disable_lora)
        if labels is not None:
            if self.binned_output:
                return F.cross_entropy(pred.float(), labels.long())
            return F.mse_loss(pred.float(), labels.float())
        if not self.binned_output:
            return pred
        if self.sample_from_bins:
            return gumbel_sample(pred, temperature=self.sample_temperature, dim=-1)
        return self.expected_rating(pred)

    @torch.no_grad()
    def score(self, prompts: Sequence[Tensor], responses: Sequence[Tensor], batch_size: int = 32,
              max_len: int | None = None, disable_lora: bool = False) -> Tensor:
        """Rewards (b,) for (prompt, response) token sequences of any lengths, in eval mode.

        Rows are right-padded (with a causal PaLM, real tokens never see the padding), scored
        `batch_size` at a time, and returned in the input order.
        """
        with eval_mode(self):
            device = self.prompt_embed.device
            out = []
            for i in range(0, len(prompts), batch_size):
                x, mask, plens = pack_prompt_response(prompts[i:i + batch_size], responses[i:i + batch_size],
                                                      max_len=max_len)
                out.append(self(x.to(device), mask=mask.to(device), prompt_lengths=plens.to(device),
                                disable_lora=disable_lora).float())
            if not out:
                raise InputError("score() got no (prompt, response) pairs")
            return torch.cat(out)

    # ------------------------------------------------------------------ save / load

    def save_pretrained(self, directory) -> Path:
        """Write `config.json` (PaLM + reward settings) and `model.safetensors`, atomically."""
        # scopes the PaLM had before the reward scope was added are rebuilt by from_pretrained
        config = {"model_type": "reward_model", "format_version": 1,
                  "palm": palm_config(self.palm, skip=self.reward_lora_scope), "reward": self.reward_config}
        return write_pretrained(self, directory, config)

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu", **overrides) -> "RewardModel":
        """Rebuild a RewardModel saved by `save_pretrained`; `overrides` replace reward settings
        (e.g. ``sample_from_bins=True``, ``dropout=0.0``)."""
        directory = Path(directory)
        config = read_config(directory)
        if config.get("model_type") != "reward_model":
            raise CheckpointError(f"{directory}: not a RewardModel checkpoint (config.json has no "
                                  f"model_type 'reward_model'); a PaLM checkpoint loads with PaLM.from_pretrained")
        palm = build_palm(PaLM, config["palm"], directory / CONFIG_NAME)
        reward_config = {**config["reward"], **overrides}
        # a reward model saved before alpha existed trained its scope at scale 1 (alpha = r)
        reward_config.setdefault("lora_alpha", reward_config.get("lora_r", 8))
        try:
            model = cls(palm, **reward_config)
        except TypeError as e:
            raise CheckpointError(f"{directory / CONFIG_NAME}: {e}") from e
        load_into(model, load_state_dict_file(directory / WEIGHTS_NAME), source=str(directory / WEIGHTS_NAME))
        return model.to(map_location)


__all__ = ["RewardModel", "pack_prompt_response", "POOLINGS"]
