"""Tiny Hugging Face checkpoints of each supported family, built by transformers in the test (no download)."""

from __future__ import annotations

import torch

FAMILY_CASES = {
    # family: (transformers config class name, extra config)
    "llama": ("LlamaConfig", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-linear-bias": ("LlamaConfig", dict(rope_scaling={"rope_type": "linear", "factor": 2.0},
                                              attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(sliding_window=512)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=24)),
}


def make_hf_checkpoint(case: str, directory, *, vocab: int = 384, seed: int = 0, dtype=torch.float32, **overrides):
    """A random transformers model of `case` saved (safetensors) to `directory`; returns the model."""
    import transformers

    cls_name, extra = FAMILY_CASES[case]
    settings = dict(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.2, rms_norm_eps=1e-5,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = getattr(transformers, cls_name)(**{**settings, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():  # non-trivial norm gains and biases, so a swapped tensor shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model
