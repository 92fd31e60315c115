"""Serving what you trained: an OpenAI-compatible HTTP API with continuous batching
(`palm-rlhf serve`) and the engine behind it, also used by `palm-rlhf chat`.

`engine`, `worker`, `batch`, `text`, `template`, `loading` and `chat` need only torch; `app` needs the
`web` extra (`pip install palm-rlhf[web]`). See docs/serving.md.
"""

from .engine import Delta, Engine, Failure, Params, QueueFull
from .loading import Loaded, load_for_inference, set_threads
from .template import ChatTemplate
from .worker import EnginePool, EngineProcess, Source

__all__ = ["Engine", "Params", "Delta", "Failure", "QueueFull", "Loaded", "load_for_inference", "set_threads",
           "ChatTemplate", "EngineProcess", "EnginePool", "Source"]
