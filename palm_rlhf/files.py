"""Files that survive a kill and never run code: the one home of atomic writes and safe reads.

- Writes go to a temporary name `.NAME.XXXXXXXX.tmp` beside the target and are renamed into
  place; `remove_temporaries` deletes what a killed writer left behind (each atomic write does
  so for its own target, `CheckpointManager` for a whole run at start-up). Large writes stream
  into the temporary file (`atomic_write`, `atomic_torch_save`, `atomic_save_tensors`): none
  builds the whole file in memory first, and safetensors take one tensor at a time to the host.
- `.pt` files are read with `weights_only=True`; a pickle that asks to run code is refused with
  one line naming what it asked for (`load_plain`). A corrupt safetensors file is a
  `CheckpointError` naming the file.

Layer 0: every layer that writes or reads a file uses these (model checkpoints, run checkpoints,
tokenizers, prepared corpora, metrics, the feedback export).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import re
import shutil
import struct
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .errors import CheckpointError

TEMP_SUFFIX = ".tmp"
# `tempfile`'s 8 random characters between the target's name and the suffix
_RANDOM_PART = r"\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX)


# ---------------------------------------------------------------- temporary names and atomic writes


def is_temporary(name: str) -> bool:
    """True for the names this library gives files and directories while they are written or
    deleted: `.NAME....tmp` (and `.tmp-*`, the staging directories of earlier versions)."""
    return name.startswith(".") and (name.endswith(TEMP_SUFFIX) or name.startswith(".tmp-"))


def remove_temporaries(directory, target: str | None = None) -> list[Path]:
    """Delete the temporaries a killed writer left in `directory` (only those of the file
    `target` when given); returns what was removed. Call it only where no other process is
    writing: the one writer of a run at start-up, or an atomic write for its own target."""
    directory = Path(directory)
    if target is None:
        match = is_temporary
    else:
        # exactly `.TARGET.XXXXXXXX.tmp`: `.latest.json.XXXXXXXX.tmp` is not a temporary of `latest`
        match = re.compile(r"\." + re.escape(target) + _RANDOM_PART).fullmatch
    removed = []
    try:
        entries = [p for p in directory.iterdir() if match(p.name)]
    except OSError:  # no such directory yet
        return removed
    for path in entries:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def create_temporary(path: Path) -> tuple[int, str]:
    """(fd, name) of a new temporary file `.NAME.XXXXXXXX.tmp` beside `path`, to be renamed onto
    it, with the mode of a published file (`FILE_MODE`); what an earlier, killed write of `path`
    left is removed first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_temporaries(path.parent, path.name)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.fchmod(fd, FILE_MODE)
    return fd, name



def unusable_dir_reason(directory: Path) -> str | None:
    """Why `directory` cannot be created and written to, or None if it can. The probe file has a
    temporary name, so even a kill between its write and its removal leaves nothing for good."""
    directory = Path(directory)
    try:
        fd, probe = create_temporary(directory / "write_test")
        os.close(fd)
        os.unlink(probe)
        return None
    except OSError as e:
        blocker = next((p for p in [directory, *directory.parents] if p.exists() and not p.is_dir()), None)
        return f"{str(blocker)!r} is a file" if blocker is not None else (e.strerror or str(e))

# mkstemp creates 0600 files; published files get what open() would give: 0666 minus the umask
# (0644 under the usual 022), so a tokenizer or checkpoint can be read by whoever serves it
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


def atomic_write(path: Path, write) -> None:
    """`write(f)` into a temporary file beside `path`, fsync, rename onto `path`: readers see the old
    file or the whole new one, never part of it. `write` streams into `f` as it goes, so nothing
    needs the whole file in memory first."""
    path = Path(path)
    fd, tmp = create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj, path: Path) -> None:
    """`torch.save(obj)` to `path` atomically. torch's zip writer copies each tensor's storage from its
    memory to the file, one record at a time, so the save holds no serialised copy of `obj` (saving
    into a `BytesIO` first held one: the size of the optimizer state, at the end of a run)."""
    atomic_write(path, lambda f: torch.save(obj, f))


# safetensors' dtype names, in the order its writer lays tensors out (then by name within a dtype)
_SAFETENSORS_NAMES = {torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.float32: "F32",
                       torch.uint32: "U32", torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16",
                       torch.uint16: "U16", torch.int16: "I16", torch.float8_e4m3fn: "F8_E4M3",
                       torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_SAFETENSORS_ORDER = {dtype: i for i, dtype in enumerate(_SAFETENSORS_NAMES)}


def write_safetensors(f, tensors: dict, metadata: dict | None = None) -> None:
    """The safetensors file of `tensors` into the open binary file `f`, byte for byte what
    `safetensors.torch.save_file` writes, one tensor at a time: a tensor on a GPU (or a
    non-contiguous one) is copied to host memory only while its own bytes are written, where
    `save_file` needs every tensor in host memory at once."""
    for name, t in tensors.items():
        if t.dtype not in _SAFETENSORS_NAMES or t.layout != torch.strided:
            raise CheckpointError(f"cannot save tensor {name!r} ({t.dtype}, {t.layout}) as safetensors: make it a "
                                  f"dense tensor of a real or integer dtype first (e.g. .to_dense().float())")
    if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"safetensors metadata must map strings to strings, got {metadata!r}")
    order = sorted(tensors, key=lambda k: (_SAFETENSORS_ORDER[tensors[k].dtype], k))
    header: dict = {"__metadata__": dict(metadata)} if metadata is not None else {}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for name in order:
        t = tensors[name].detach()
        if t.numel():
            host = t.contiguous().cpu().reshape(-1)  # (numel,): this tensor only
            f.write(memoryview(host.view(torch.uint8).numpy()))
            del host  # freed before the next one is copied


def atomic_save_tensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """A safetensors file written atomically and streamed (`write_safetensors`)."""
    atomic_write(Path(path), lambda f: write_safetensors(f, tensors, metadata))


# ---------------------------------------------------------------- reading


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's text on one line (the CLI prints every error as one line)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pickle_globals(path: Path) -> list[str]:
    """`module.name` of each global the pickles in `path` would import, read without unpickling."""
    try:
        if zipfile.is_zipfile(path):  # torch.save's format: the pickle is `<archive>/data.pkl`
            with zipfile.ZipFile(path) as z:
                blobs = [z.read(n) for n in z.namelist() if n.endswith(".pkl")]
        else:  # a plain pickle, or torch's legacy format (several pickles in a row)
            blobs = [path.read_bytes()]
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return []
    found: list[str] = []
    for blob in blobs:
        stream = io.BytesIO(blob)
        while stream.tell() < len(blob):
            pushed: list[str | None] = []  # recent pushes: the strings STACK_GLOBAL pops
            memo: dict = {}
            try:
                for op, arg, _ in pickletools.genops(stream):
                    if op.name in ("GLOBAL", "INST"):
                        found.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(pushed) >= 2 and None not in pushed[-2:]:
                        found.append(f"{pushed[-2]}.{pushed[-1]}")
                    elif op.name == "MEMOIZE":
                        memo[len(memo)] = pushed[-1] if pushed else None
                    elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                        memo[arg] = pushed[-1] if pushed else None
                    elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                        pushed.append(memo.get(arg))
                    elif op.name not in ("FRAME", "PROTO"):
                        is_text = isinstance(arg, str) and ("STRING" in op.name or "UNICODE" in op.name)
                        pushed.append(arg if is_text else None)
            except ValueError:  # not (or no longer) a pickle
                break
    return found


def _code_it_asks_for(path: Path, error: Exception) -> list[str]:
    """The globals a weights-only load refused; [] when the file is simply not a pickle."""
    names = re.findall(r"GLOBAL ([\w.]+)", str(error))
    if not names:
        names = [g for g in _pickle_globals(path) if not g.startswith(("torch.", "collections.OrderedDict"))]
    return list(dict.fromkeys(names))


def _unpickler_reason(error: Exception) -> str:
    """PyTorch's weights-only error without its advice (to load with weights_only=False, to file an
    issue, to read the docs): only the line that says what it tripped on."""
    noise = ("weights_only", "Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [line for line in str(error).splitlines() if line.strip() and not any(n in line for n in noise)]
    return one_line(Exception(" ".join(lines)) if lines else error, 160)


def load_plain(path, *, what: str = "state dict", fix: str | None = None, map_location="cpu"):
    """`torch.load(path, weights_only=True)`, the one way this library reads a `.pt` file.

    A file that would run code when unpickled gets one line naming what it asks for and the
    fix (`fix`; default: re-save the tensors as safetensors); never PyTorch's advice to load
    it with weights_only=False. A truncated or corrupt file gets a CheckpointError naming it
    (and `fix`, when given).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():  # a plain pickle of protocol > 2 would add a multi-line warning
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        names = _code_it_asks_for(path, e)
        if not names:
            raise CheckpointError(f"{path}: cannot read (truncated or corrupt, or not a PyTorch file?): "
                                  f"{_unpickler_reason(e)}{'. ' + fix if fix else ''}") from None
        advice = fix or (f"Convert trusted files with safetensors.torch.save_file(state_dict, "
                         f"'{path.stem}.safetensors') in the program that made them")
        raise CheckpointError(f"{path}: not a plain {what} (it asks to run code: {', '.join(names[:5])}); "
                              f"refusing to load it. {advice}") from None
    except Exception as e:  # noqa: BLE001 - truncated or corrupt: whatever the unpickler tripped on
        raise CheckpointError(f"{path}: cannot read (truncated or corrupt?): {one_line(e)}"
                              f"{'. ' + fix if fix else ''}") from e


def read_safetensors_header(path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """({name: shape}, metadata) of a safetensors file, without reading its tensors."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, (f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {one_line(e)}") from e


def load_state_dict_file(path: Path, map_location="cpu") -> dict:
    """Read a state dict from `.safetensors` or `.pt`/`.bin` (weights_only=True)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; use PaLM.from_pretrained({str(path)!r})")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path), device=str(map_location))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): "
                                  f"{one_line(e)}") from e
    else:
        state = load_plain(path, map_location=map_location)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state_dict)")
    return state


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def stream_safetensors(path):
    """Yield (name, tensor) for each tensor of a safetensors file, in file order, each a view of a
    private memory map. Read each before asking for the next: the pages of a tensor already
    read are handed back to the kernel (`MADV_DONTNEED`), so reading a file into a model that is
    already allocated raises the resident memory by about one tensor, not the file's size."""
    import mmap

    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"header of {header_len} bytes in a file of {size}")
            header = json.loads(f.read(header_len))
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + header_len else None
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {one_line(e)}") from e
    header.pop("__metadata__", None)
    base, page = 8 + header_len, mmap.PAGESIZE
    try:
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            start, end = info["data_offsets"]
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None or base + end > size:
                raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']} or extends past the end "
                                      f"of the file (truncated or corrupt?)")
            count = (end - start) // max(1, torch.empty((), dtype=dtype).element_size())
            flat = torch.frombuffer(mm, dtype=dtype, count=count, offset=base + start) if count else \
                torch.empty(0, dtype=dtype)
            yield name, flat.view(info["shape"])
            del flat
            lo = (base + start) // page * page
            if end > start:
                mm.madvise(mmap.MADV_DONTNEED, lo, min(size, base + end) - lo)
    finally:
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a caller still holds a view: the map closes when it is freed
                pass
