"""``malora-fx sweep --jobs N``: one sweep split over N processes (shards) that share its directory.

A small model leaves most of a GPU idle: one process spends its time launching kernels. N processes,
each running every N-th cell (:func:`~.sweep.shard_cells`), keep it busier. The parent prepares the
directory once (so the shards find ``spec.json`` and no partial cell of an earlier run), starts the
shards, waits for all of them, and writes the report over every finished cell. With
``lr_search_seeds``, a shard may stop while a later-seed cell of its share still waits for another
shard's search cells; the parent then starts another round for the cells that became runnable.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..errors import MaloraError
from .sweep import (
    RESULTS,
    Cell,
    Say,
    cells,
    load_spec,
    only_seeds,
    parse_seeds,
    prepare_dir,
    read_results,
    slots,
    with_device,
    with_methods,
    with_suites,
)
from .sweep_dir import say_stderr


def shard_command(
    spec: str | Path,
    out: str | Path,
    index: int,
    jobs: int,
    device: str | None,
    methods: str | None = None,
    seeds: str | None = None,
    suites: str | None = None,
) -> list[str]:
    """The command line of shard ``index`` of ``jobs`` (the report is left to the parent)."""
    command = [sys.executable, "-m", "malora_fx.cli", "sweep", str(spec), "--out", str(out)]
    command += ["--shard", f"{index}/{jobs}", "--no-report"]
    command += ["--device", device] if device else []
    command += ["--methods", methods] if methods else []
    command += ["--suites", suites] if suites else []
    return command + (["--seeds", seeds] if seeds else [])


def _run_round(commands: list[list[str]], env: dict[str, str]) -> list[int]:
    """Start one process per command, wait for all; their exit codes (all stopped if this one is)."""
    shards = [subprocess.Popen(command, env=env) for command in commands]
    try:
        return [shard.wait() for shard in shards]
    except BaseException:
        for shard in shards:
            shard.terminate()
        raise


def run_jobs(
    spec_path: str | Path,
    out: str | Path,
    jobs: int,
    *,
    device: str | None = None,
    methods: str | None = None,
    suites: str | None = None,
    seeds: str | None = None,
    report: bool = True,
    say: Say | None = None,
) -> list[dict[str, Any]]:
    """Run ``spec_path`` into ``out`` with ``jobs`` shard processes at once; all finished rows.

    Each shard gets ``OMP_NUM_THREADS`` = CPU cores // jobs unless it is set. A failed shard is an
    error once all have stopped (the others' cells are kept; the same command resumes)."""
    say = say or say_stderr
    if jobs < 1:
        raise MaloraError(f"jobs: {jobs}; allowed: 1 or more")
    spec = load_spec(spec_path)
    if device:
        spec = with_device(spec, device)
    if methods:
        spec = with_methods(spec, methods)
    if suites:
        spec = with_suites(spec, suites)
    chosen = parse_seeds(spec, seeds) if seeds else None
    out = Path(out)
    plan = only_seeds(slots(spec, read_results(out / RESULTS)), chosen)
    jobs = min(jobs, len(plan))
    prepare_dir(out, spec, say, {c.id for c in plan if isinstance(c, Cell)} if methods or suites or seeds else None)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    commands = [shard_command(spec_path, out, i, jobs, device, methods, seeds, suites) for i in range(1, jobs + 1)]
    while True:
        say(f"starting {jobs} shards")
        codes = _run_round(commands, env)
        rows = read_results(out / RESULTS)
        runnable = [c for c in only_seeds(cells(spec, rows), chosen) if c.id not in {r["id"] for r in rows}]
        if any(codes) or not runnable:
            break
        say(f"{len(runnable)} cells can run now that their lr is chosen: another round")
    rows = read_results(out / RESULTS)
    if report and rows:
        from .sweep_report import write_report

        say("report: " + ", ".join(str(p) for p in write_report(out)))
    failed = [str(i) for i, code in enumerate(codes, 1) if code]
    if failed:
        raise MaloraError(
            f"jobs: shard {', '.join(failed)} of {jobs} failed (its messages are above); "
            "run the same command again to resume"
        )
    return rows
