"""The one JSONL reader behind every strict record format (preferences, SFT, scoring requests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..errors import DataError


def iter_jsonl(path, *, missing: str) -> Iterator[tuple[str, object]]:
    """Yield ``(where, obj)`` for every non-blank line, ``where`` being ``"path:line"`` for the
    caller's own error messages. A missing file raises ``DataError(f"{path}: {missing}")``;
    text that is not UTF-8, or a line that is not JSON, raises DataError naming the line.

    Lines are split on "\\n" only: JSON written with ``ensure_ascii=False`` may hold U+2028
    and other characters that `str.splitlines` would also split on.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {missing}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    for lineno, raw in enumerate(data.split(b"\n"), 1):  # b"\n" never occurs inside a UTF-8 character
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 (byte {e.start + 1} of the line is {raw[e.start:e.end]!r}); "
                            "save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        yield where, obj


__all__ = ["iter_jsonl"]
