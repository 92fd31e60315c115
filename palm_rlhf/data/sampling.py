"""The one seeded sampler and the one train/held-out split every trainer uses.

* `seeded(seed, *salts)`: a `torch.Generator` for one purpose of one step (data order, prompt draws,
  minibatch order): a pure function of its arguments, so a resumed run replays the same draws.
* `stream_indices(seed, n, positions)`: the endless stream of examples: position `i` is entry
  `i mod n` of epoch `i // n`'s permutation of the `n` examples. A step's batch is a set of
  positions (`runtime.vocab.step_positions`), so the step number is the whole data position.
* `split_heldout(records, fraction, seed)`: a seeded shuffle, then `fraction` of the records (at
  least one, leaving at least one to train on) held out.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ..errors import DataError

__all__ = ["seeded", "epoch_order", "stream_indices", "split_heldout"]


def seeded(seed: int, step: int = 0, salt: int = 0) -> torch.Generator:
    """A generator seeded by (seed, step, salt); distinct salts give independent draws of one step."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2 ** 63))


def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    """Epoch `epoch`'s permutation of `n` examples."""
    return torch.randperm(n, generator=seeded(seed, epoch, 5)).tolist()


def stream_indices(seed: int, n: int, positions: Iterable[int]) -> list[int]:
    """Dataset indices at `positions` of the endless stream of per-epoch permutations."""
    if n < 1:
        raise DataError("no examples to draw from")
    out, cache = [], {}
    for pos in positions:
        epoch, i = divmod(int(pos), n)
        if epoch not in cache:
            cache[epoch] = epoch_order(seed, epoch, n)
        out.append(cache[epoch][i])
    return out


def split_heldout(records: Sequence, fraction: float, seed: int, key: str = "eval.fraction") -> tuple[list, list]:
    """(train, held out): a seeded shuffle, then round(len * fraction) records held out (at least one);
    fraction 0 holds out nothing. Leaving nothing to train on is a DataError naming `key`."""
    records = list(records)
    if fraction <= 0 or not records:
        return records, []
    n_held = max(1, round(len(records) * fraction))
    if n_held >= len(records):
        raise DataError(f"{len(records)} record(s) leave nothing to train on after holding out {fraction:.0%}; "
                        f"add records, lower {key}, or give a held-out file (eval.data=FILE)")
    order = torch.randperm(len(records), generator=seeded(seed, 0, 11)).tolist()
    return [records[i] for i in order[n_held:]], [records[i] for i in order[:n_held]]
