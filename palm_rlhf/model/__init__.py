"""Pure `nn.Module`s: PaLM, its layers, LoRA, the KV cache and checkpoint I/O."""

from .kv_cache import KVCache
from .lora import LoRA
from .palm import PaLM

__all__ = ["PaLM", "LoRA", "KVCache"]
