"""Building what a run starts from: the model and its tokenizer (every trainer), prompts and reward (RL)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError, DataError
from ..data.chat import check_messages, prompt_ids, template_for
from ..data.prompts import read_prompts
from ..model.palm import PaLM
from ..model.reward import RewardModel
from ..rl.rewards import MissingEOSPenalty, ModelReward, WeightedReward, as_reward_source, import_reward_function
from ..runtime.resolve import check_tokenizer_fits, load_tokenizer_for, resolve_model


def load_start(model_path, tokenizer: str | None = None) -> tuple[PaLM, object]:
    """The starting model `model=` names (a run, final/, model or checkpoint directory) and the
    tokenizer that follows it (`tokenizer=` overrides); a tokenizer the model cannot embed is a
    ConfigError here, before any training."""
    source = resolve_model(model_path)
    model = PaLM.from_pretrained(source.model_dir)
    tok = load_tokenizer_for(source, tokenizer)
    check_tokenizer_fits(tok, model.num_tokens, where=f"model={model_path}")
    return model, tok


def check_tokenizer(tokenizer, model, where: str = "model") -> None:
    """For a model and tokenizer passed in as objects."""
    if tokenizer is not None and hasattr(tokenizer, "vocab_size"):
        check_tokenizer_fits(tokenizer, model.num_tokens, where=where)


def load_prompts(source, tokenizer, template=None) -> list[torch.Tensor]:
    """Prompts from a list (of token tensors, of strings or of chat message lists, with a tokenizer) or a
    .txt/.jsonl file. Chat prompts render with `template` (None: `data.chat.template_for(tokenizer)`)."""
    if isinstance(source, (str, Path)):
        source = read_prompts(source, key="prompts=", messages=True)  # the feedback app's reader: \n, .jsonl
    out = []
    for i, p in enumerate(source):
        chat = isinstance(p, list) and bool(p) and isinstance(p[0], dict)
        if (isinstance(p, str) or chat) and tokenizer is None:
            raise ConfigError("text prompts need a tokenizer (pass tokenizer=...)")
        if chat:
            p = prompt_ids(template or template_for(tokenizer), tokenizer, check_messages(p, f"prompt {i}"))
        elif isinstance(p, str):
            p = tokenizer.encode(p)
        t = torch.as_tensor(p, dtype=torch.long).reshape(-1)
        if t.numel() == 0:
            raise DataError(f"prompt {i} is empty; every prompt needs at least one token")
        out.append(t)
    if not out:
        raise DataError("no prompts: the prompt list/file is empty")
    return out


def load_reward(reward, config, tokenizer):
    """The run's reward source: an object passed in, else the config's reward model and/or function."""
    if reward is None:
        parts = []
        if config.reward_model:
            # a run directory, final/ or step directory, like model=
            reward_model = RewardModel.from_pretrained(resolve_model(config.reward_model).model_dir, dropout=0.0)
            if tokenizer is not None:
                check_tokenizer_fits(tokenizer, reward_model.palm.num_tokens, f"reward_model={config.reward_model}")
            parts.append((reward_model, config.reward_model_weight))
        if config.reward_fn:
            fn = import_reward_function(config.reward_fn)
            parts.append((as_reward_source(fn, tokenizer), config.reward_fn_weight))
        if not parts:
            raise ConfigError("no reward: set reward_model=path/to/reward_model and/or reward_fn=module:function")
        reward = parts[0][0] if len(parts) == 1 and parts[0][1] == 1.0 else parts
    source = as_reward_source(reward, tokenizer)
    if config.missing_eos_penalty:
        source = MissingEOSPenalty(source, config.missing_eos_penalty)
    return source


def reward_models(source) -> list[RewardModel]:
    """The RewardModels a reward source scores with (inside weighted sums and the EOS penalty)."""
    if isinstance(source, ModelReward):
        return [source.model]
    if isinstance(source, WeightedReward):
        return [m for part, _ in source.parts for m in reward_models(part)]
    if isinstance(source, MissingEOSPenalty):
        return reward_models(source.source)
    return []
