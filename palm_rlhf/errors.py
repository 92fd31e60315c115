"""Every user-facing failure in palm-rlhf is a `PalmRLHFError`.

Each message says what went wrong *and what to change*. The classes also derive
from the built-in exception a caller would naturally catch (``ValueError``,
``OSError``), so code written against plain Python keeps working.
"""

from __future__ import annotations


class PalmRLHFError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(PalmRLHFError, ValueError):
    """An invalid configuration value; the message names the field or CLI flag."""


class InputError(PalmRLHFError, ValueError):
    """A tensor or argument passed at call time is unusable (wrong dtype, range, shape)."""


class DataError(PalmRLHFError, ValueError):
    """A corpus or record file is missing, empty or malformed (with file and line)."""


class CheckpointError(PalmRLHFError, OSError):
    """A checkpoint cannot be read or does not match the model it is loaded into."""


class TrainingError(PalmRLHFError, RuntimeError):
    """Training cannot continue (for example a NaN loss); the message names the step."""
