"""A sweep directory: checking and preparing it, and taking finished cells from another copy of its results.

The layout is :mod:`.sweep`'s; ``results.jsonl`` is :mod:`.sweep_results`'s.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import MaloraError
from ..fileio import atomic_write
from .sweep_plan import rows_of_spec
from .sweep_results import RESULTS, append_result, read_results
from .sweep_spec import SweepSpec

__all__ = ["Say", "import_results", "prepare_dir", "say_stderr", "write_json"]

Say = Callable[[str], None]


def say_stderr(message: str) -> None:
    """A sweep's progress line, on stderr."""
    print(f"malora-fx: sweep: {message}", file=sys.stderr, flush=True)


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON at ``path``, written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def prepare_dir(out: Path, spec: SweepSpec, say: Say, own: set[str] | None = None) -> list[dict[str, Any]]:
    """Check ``out`` (new, empty, or an earlier sweep's), record the spec, clear partial cells; the finished rows.

    ``own`` (a shard's cell ids) limits the clearing to those cells, so that shards running at the same
    time in one directory leave each other's cells in progress alone.
    """
    if out.exists() and not out.is_dir():
        raise MaloraError(f"out: {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "spec.json").is_file():
        raise MaloraError(f"out: {str(out)!r} is not empty and holds no sweep (no spec.json); choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    previous, recorded = out / "spec.json", json.loads(json.dumps(spec.to_dict(), sort_keys=True))
    if previous.is_file() and json.loads(previous.read_text()) != recorded:
        say("the spec differs from the one recorded in spec.json; finished cells with the same settings are kept")
    write_json(previous, recorded)
    rows = read_results(out / RESULTS)
    done = {r["id"] for r in rows}
    for folder in sorted((out / "cells").glob("*")) if (out / "cells").is_dir() else []:
        name = folder.name.removesuffix(".tmp")
        if own is not None and name not in own:
            continue
        if folder.name.endswith(".tmp") or folder.name not in done:
            say(f"removing the unfinished cell {folder.name}")
            shutil.rmtree(folder, ignore_errors=True)
    return rows


def import_results(
    out: str | Path, source: str | Path, spec: SweepSpec, say: Say | None = None, *, write: bool = True
) -> list[dict[str, Any]]:
    """Count ``source``'s finished cells (another copy of a sweep's ``results.jsonl``) as finished in ``out``.

    The rows of ``source`` that are cells of ``spec``'s full grid (every lr and seed, on any device:
    :func:`~.sweep_plan.rows_of_spec`) and not yet in ``out/results.jsonl`` are appended to it; rows of
    other cells are left out (and counted), rows already in ``out`` stay as they are. ``out`` is
    prepared as a sweep directory (:func:`prepare_dir`, clearing nothing). ``write=False`` (a dry run)
    writes nothing. Returns the rows ``out`` then holds.
    A ``source`` that is missing, or whose rows are none of ``spec``'s cells, is an error.
    """
    say = say or say_stderr
    out, source = Path(out), Path(source)
    if not source.is_file():
        raise MaloraError(f"from-results: {str(source)!r} is not a file; give a sweep's results.jsonl")
    theirs = read_results(source)
    kept, other = rows_of_spec(spec, theirs)
    if theirs and not kept:
        raise MaloraError(
            f"from-results: none of the {len(theirs)} rows of {str(source)!r} is a cell of {spec.source} "
            "(another spec, or other settings)"
        )
    ours = prepare_dir(out, spec, say, own=set()) if write else read_results(out / RESULTS)
    present = {row["id"] for row in ours}
    new = [row for row in kept if row["id"] not in present]
    for row in new if write else ():
        append_result(out / RESULTS, row)
    already = f", {len(kept) - len(new)} already here" if len(new) < len(kept) else ""
    left_out = f", {other} rows of other cells left out" if other else ""
    say(f"{len(new)} finished cells taken from {source}{already}{left_out}")
    return ours + new
