"""A sweep's ``results.jsonl``: one JSON line per finished cell, the only record of "done".

Reading drops a last line cut short by a kill; appending cuts such a line off first and holds a file
lock, so shards appending at once neither interleave nor truncate each other's lines.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import MaloraError

__all__ = ["RESULTS", "append_result", "read_results"]

RESULTS = "results.jsonl"


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The finished cells' lines. A last line cut short by a kill is ignored; any other bad line is an error."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: an append that was killed
                continue
            raise MaloraError(f"{path}:{number}: not a JSON line; remove it to rerun that cell") from None
        if not isinstance(row, dict) or "id" not in row:
            raise MaloraError(f"{path}:{number}: not a sweep result (no 'id'); remove it to rerun that cell")
        rows.append(row)
    return rows


def append_result(path: Path, row: dict[str, Any]) -> None:
    """Append one line; a partial last line left by a kill is cut off first.

    The file is locked (``flock``) for the check and the append, so shards appending at the same time
    neither interleave their lines nor take one another's line in progress for a killed one."""
    import fcntl

    line = (json.dumps(row, sort_keys=True) + "\n").encode("utf-8")
    with open(path, "ab") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            size = handle.seek(0, os.SEEK_END)
            if size:
                with open(path, "rb") as reader:
                    reader.seek(max(0, size - 1))
                    if reader.read(1) != b"\n":
                        text = path.read_bytes()
                        handle.truncate(text.rfind(b"\n") + 1)
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
