"""Atomic, resumable training checkpoints: one directory per step plus a `latest` pointer.

Layout (under `run_dir/checkpoints/`):

    step_00000100/
        state.pt             trainer state: optimizer, scheduler, step, RNG states, data position,
                             resolved config ... (read back with torch.load(weights_only=True))
        config.json          \\ the model as a `save_pretrained` directory, so
        model.safetensors    /  PaLM.from_pretrained(step_dir) loads it directly
        tokenizer.json ...   the tokenizer, so a checkpoint always decodes correctly
    latest                   text file naming the newest complete step directory

A checkpoint is written into a hidden temporary directory which is renamed into place only
when every file is on disk; `latest` is then replaced atomically. Older step directories beyond
`keep_last` are renamed to a temporary name after the new one is published, then deleted. A
crash at any point therefore leaves at worst temporaries (`.NAME....tmp`), never a broken
`latest` nor a half-deleted step directory; the writer's next start removes them (and any
`step_*` directory an older version left half-deleted), and its next save prunes again, so
`keep_last` holds after any crash.
Tools that only read a run (`palm-rlhf info` on a live run) pass `is_main=False`: they never
touch its files.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..files import (TEMP_SUFFIX, atomic_save_tensors, atomic_torch_save, atomic_write_bytes, load_plain,
                     remove_temporaries)
from .seed import rng_state, set_rng_state  # noqa: F401 - re-exported: checkpoints carry RNG states

log = logging.getLogger(__name__)

__all__ = ["CheckpointManager", "rng_state", "set_rng_state", "STATE_NAME"]

STATE_NAME = "state.pt"
LATEST_NAME = "latest"
_PREFIX = "step_"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointManager:
    """Save / find / load step checkpoints of one run. Only the main process writes."""

    def __init__(self, run_dir, keep_last: int = 3, is_main: bool = True, subdir: str = "checkpoints"):
        if keep_last < 1:
            raise CheckpointError(f"keep_last={keep_last}: keep at least one checkpoint")
        self.dir = Path(run_dir) / subdir
        self.keep_last = keep_last
        self.is_main = is_main
        if is_main and self.dir.is_dir():
            self._remove_debris()

    def _remove_debris(self) -> None:
        """Start-up: delete what a killed save or prune left (this process is the run's one writer)."""
        removed = remove_temporaries(self.dir)
        complete = self.list()
        for step in self.dir.glob(f"{_PREFIX}*"):  # pruned in place by versions before temp renames
            if step.is_dir() and step not in complete and complete and step.name < complete[-1].name:
                shutil.rmtree(step, ignore_errors=True)
                removed.append(step)
        if removed:
            log.info("removed %d leftover(s) of an interrupted save or prune in %s: %s", len(removed), self.dir,
                     ", ".join(p.name for p in removed))

    def _temporary(self, name: str, why: str) -> Path:
        return self.dir / f".{name}.{why}-{os.getpid()}{TEMP_SUFFIX}"

    # ------------------------------------------------------------------ writing

    def save(self, step: int, state: dict, *, model=None, tokenizer=None) -> Path | None:
        """Write `step_XXXXXXXX/` atomically and point `latest` at it; returns its path (None off rank 0).

        `model` is anything with `save_pretrained(dir)` (PaLM, RewardModel) or a plain dict of
        tensors (e.g. a gathered FSDP state dict), stored as `model.safetensors`.
        """
        if not self.is_main:
            return None
        final = self.dir / f"{_PREFIX}{step:08d}"
        tmp = self._temporary(final.name, "saving")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            if model is not None:
                if isinstance(model, dict):
                    atomic_save_tensors(model, tmp / "model.safetensors", metadata={"format": "pt"})
                else:
                    model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save(tmp)
            atomic_torch_save(state, tmp / STATE_NAME)  # streamed: no in-memory copy of the optimizer state
            _fsync_dir(tmp)
            trash = None
            if final.exists():  # re-saving a step (e.g. after resume): move the old one aside first
                trash = self._temporary(final.name, "replaced")
                os.replace(final, trash)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
            atomic_write_bytes(self.dir / LATEST_NAME, final.name.encode())
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"cannot write checkpoint {final}: {e}; check free space and permissions "
                                  f"of {self.dir}") from e
        self._prune(keep=final)
        log.info("saved checkpoint %s", final)
        return final

    def _prune(self, keep: Path | None) -> None:
        """Delete the oldest step directories beyond `keep_last`: each is first renamed to a
        temporary name (atomic), so a kill mid-delete leaves a temporary, not a step directory
        that `list()` no longer counts and nothing would ever prune."""
        steps = self.list()
        for old in steps[: max(0, len(steps) - self.keep_last)]:
            if old == keep:
                continue
            trash = self._temporary(old.name, "pruned")
            try:
                os.replace(old, trash)
            except OSError as e:
                log.warning("cannot prune %s (%s); it is kept", old, e)
                continue
            _fsync_dir(self.dir)
            shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------------ reading

    def list(self) -> list[Path]:
        """Complete step directories, oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob(f"{_PREFIX}*") if (p / STATE_NAME).is_file())

    def latest(self) -> Path | None:
        """The directory `latest` names; if that is missing, the newest complete step directory."""
        pointer = self.dir / LATEST_NAME
        if pointer.is_file():
            try:
                candidate = self.dir / pointer.read_text().strip()
            except OSError:
                candidate = None
            if candidate is not None and (candidate / STATE_NAME).is_file():
                return candidate
            log.warning("%s names a missing checkpoint; using the newest complete one", pointer)
        steps = self.list()
        return steps[-1] if steps else None

    def load(self, path=None, map_location="cpu") -> dict:
        """The trainer state of `path` (a step directory; default: latest). Adds `dir` to it."""
        directory = Path(path) if path is not None else self.latest()
        if directory is None:
            raise CheckpointError(f"no checkpoint in {self.dir}; train first or pass the right run directory")
        file = directory / STATE_NAME
        if not file.is_file():
            raise CheckpointError(f"{directory}: no {STATE_NAME}; is this a step directory of a training run?")
        state = load_plain(file, what="trainer state", map_location=map_location,
                           fix=f"Delete {directory} to fall back to an older checkpoint")
        if not isinstance(state, dict):
            raise CheckpointError(f"{file}: expected a dict of trainer state")
        state["dir"] = str(directory)
        return state
