"""A tiny PaLM pretrained once per test session on synthetic lowercase text, and a
verifiable reward: the fraction of vowels in the completion (token ids are bytes)."""

from __future__ import annotations

import random

import pytest
import torch

from palm_rlhf.model.palm import PaLM

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "big", "red", "sun", "it", "is", "hot", "and",
         "we", "go", "out", "now", "you", "see", "tree", "by", "sea", "idea", "area", "eye"]
EOS = 10  # "\n" ends a line of the corpus


def corpus(n_lines: int = 600, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))) for _ in range(n_lines)]
    return ("\n".join(lines) + "\n").encode()


def vowel_fraction(prompts, completions) -> list[float]:
    """The verifiable reward: share of completion characters that are vowels (0 for an empty completion).
    Takes decoded strings (with a tokenizer) or byte-id tensors."""
    texts = [c if isinstance(c, str) else bytes(c.tolist()).decode(errors="replace") for c in completions]
    return [sum(ch in "aeiou" for ch in t) / max(len(t), 1) for t in texts]


def pretrain_tiny(steps: int = 250, seed: int = 0) -> PaLM:
    torch.manual_seed(seed)
    model = PaLM(dim=48, num_tokens=256, depth=2, heads=2, dim_head=24, cross_entropy_ignore_index=-1)
    data = torch.tensor(list(corpus()), dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - 33, (16,), generator=g)
        batch = torch.stack([data[s:s + 33] for s in starts.tolist()])
        loss = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def rl_prompts() -> list[torch.Tensor]:
    return [torch.tensor(list(f"{w} ".encode())) for w in WORDS[:12]]


@pytest.fixture(scope="session")
def pretrained_tiny_state():
    model = pretrain_tiny()
    return model.config, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def tiny_model(pretrained_tiny_state):
    config, state = pretrained_tiny_state
    model = PaLM(**config)
    model.load_state_dict(state)
    return model
