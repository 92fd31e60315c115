"""oneDNN's linear through torch's private mkldnn ops, guarded: `onednn_works` tries them once,
and every caller falls back to plain products where it returns False."""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def onednn_linear(x: Tensor, w: Tensor) -> Tensor:
    """x @ w^T by oneDNN's linear; w (out, in), plain or prepacked (`onednn_packed`). No autograd."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


@functools.cache
def onednn_works(dtype: torch.dtype) -> bool:
    """Whether this torch build runs `onednn_linear` (plain and prepacked weights) in `dtype`."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w = torch.zeros(1, 4, dtype=dtype), torch.zeros(4, 4, dtype=dtype)
        onednn_linear(x, torch.ops.mkldnn._reorder_linear_weight(w, 1))
        onednn_linear(x, w)
    except (RuntimeError, AttributeError):
        return False
    return True


def onednn_packed(w_t: Tensor, rows: int) -> Tensor | None:
    """An (in, out) weight prepacked for oneDNN's linear with `rows` rows (the format
    torch.compile's freezing uses), or None where this torch build lacks it."""
    if not onednn_works(w_t.dtype):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(w_t.t().contiguous(), rows)
