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
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as UTF-8 text ({e})") from e
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        yield where, obj


__all__ = ["iter_jsonl"]
