"""Fast generation: KV-cached prefill + decode, batched variable-length prompts,
per-row stopping, correct sampling, per-token log-probs and streaming.

    from palm_rlhf.generation import SamplingConfig, generate, stream
    out = generate(model, [prompt_a, prompt_b], SamplingConfig(max_new_tokens=64, top_p=0.9, seed=0))
    out.tokens, out.log_probs, out.lengths, out.mask, out.stop_reasons
"""

from .config import SamplingConfig
from .generate import GenerationOutput, generate, stream
from .packed import PackedPrompts
from .prompts import pack_prompts
from . import compiled
from .sampling import apply_repetition_penalty, process_logits, sample

__all__ = ["SamplingConfig", "GenerationOutput", "generate", "stream", "pack_prompts", "PackedPrompts",
           "process_logits", "apply_repetition_penalty", "sample"]
