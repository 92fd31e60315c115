"""Keep glibc's malloc from handing large tensors back to the OS after every use.

By default glibc serves blocks above a (dynamically adjusted) threshold with their
own mmap and returns them on free, and trims the heap top as soon as 128 KB are
free. A training or RL step allocates and frees the same multi-megabyte
activations over and over, so each one comes back as fresh pages that the kernel
must fault in and zero. Serving blocks up to 32 MB from the heap and keeping up to
1 GiB of freed heap for reuse removed that cost: a PPO iteration of
`benchmarks/rl.py` went from 0.70 to 0.56 s (benchmarks/README.md).

This changes process-wide state, so the library never does it on import; the
`palm-rlhf` command does it at start-up (set PALM_RLHF_TUNE_MALLOC=0 to opt out),
and scripts may call `tune_malloc()` themselves. It does nothing off glibc, or when
the user already set glibc's own MALLOC_* variables or malloc tunables.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 1 << 30


def tune_malloc() -> bool:
    """Apply the settings above; True when they took effect."""
    if not sys.platform.startswith("linux") or os.environ.get("PALM_RLHF_TUNE_MALLOC", "1") == "0":
        return False
    if any(k.startswith("MALLOC_") for k in os.environ) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False  # the user tuned glibc themselves
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("tune_malloc: %s", "applied" if ok else "refused by libc")
    return ok


__all__ = ["tune_malloc"]
