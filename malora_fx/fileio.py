"""Crash-safe writing: files and directories appear complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def current_umask() -> int:
    """The process umask (read without changing it for long)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` a temporary file next to ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(out: Path, *, replace: bool = True, keep_complete: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success rename it to ``out``.

    On error the temporary directory is removed and ``out`` is untouched. An
    existing ``out`` is replaced when ``replace``, else ``FileExistsError``.
    ``keep_complete`` names a marker file for caches that several processes may
    fill at once: an ``out`` holding it (another process finished first; its
    files may be open there) is kept and the temporary directory dropped, and an
    ``out`` without it (an interrupted write) is replaced.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}.", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())
        _publish(tmp, out, replace=replace or keep_complete is not None, keep_complete=keep_complete)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, out: Path, *, replace: bool, keep_complete: str | None) -> None:
    """Rename ``tmp`` to ``out`` (see :func:`atomic_directory`)."""

    def complete() -> bool:
        return keep_complete is not None and (out / keep_complete).is_file()

    if complete():
        return
    if out.exists():
        if not replace:
            raise FileExistsError(f"{out} already exists; refusing to overwrite it")
        shutil.rmtree(out, ignore_errors=keep_complete is not None)
    try:
        os.replace(tmp, out)
    except OSError:
        if not complete():  # another process renamed its complete copy in between: keep it
            raise
