"""Which cells a sweep has, given the cells already finished: the learning rate searched on the first seeds.

A spec with ``lr_search_seeds = K`` runs every learning rate of ``lrs`` on its first K seeds only (the
search cells). Each later seed runs one cell per setting, at the lr whose search cells have the best
mean validation exact match (ties: the lower mean validation loss, then the earlier lr of ``lrs``). So
a 3-seed sweep over a grid of 3 rates costs 3 + 2 = 5 runs per setting instead of 9, and the choice
never sees the eval split. A later seed's cell is *waiting* until every search cell of its setting
has finished; its id is then that of the full-grid cell at the chosen lr, so the rows of a sweep run
without the key count for one run with it.

A setting is a cell's settings but the lr, the seed and the device: search cells run on another
device (a GPU) choose the lr for later cells run here.

:func:`slots` lays the sweep out in the order of :func:`~.sweep_spec.product` (model, suite, seed,
steps, lr, rank, method): a later seed's slot stands where its first-lr cell would. Shards take slots
(every N-th), so a shard's share does not move as lrs are chosen.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .sweep_spec import Cell, SweepSpec, product

__all__ = ["Waiting", "cells", "lr_score", "plan_counts", "rows_of_spec", "setting_key", "slots"]


@dataclass(frozen=True)
class Waiting:
    """A later seed's cell whose lr is not chosen yet: the search cells of its setting are not all done."""

    cell: Cell  # the cell at the spec's first lr, standing for the setting

    @property
    def seed(self) -> int:
        return self.cell.seed

    @property
    def name(self) -> str:
        return self.cell.id.rsplit("-", 1)[0].replace(f"-lr{self.cell.train.lr:g}-", "-lr?-")


def setting_key(settings: dict[str, Any]) -> str:
    """A cell's settings (:meth:`Cell.settings`, or a results row's ``settings``) without lr, seed and device."""
    train = {k: v for k, v in settings["train"].items() if k not in ("lr", "seed", "device")}
    config = {k: v for k, v in settings["config"].items() if k != "seed"}
    return json.dumps({**settings, "train": train, "config": config}, sort_keys=True)


def lr_score(rows: Iterable[dict[str, Any]]) -> tuple[float, float]:
    """The ordering key of an lr, higher is better: (mean validation exact match, minus mean validation loss)."""
    rows = list(rows)
    return (
        statistics.fmean(r["validation"]["exact_match"] for r in rows),
        -statistics.fmean(r["validation"]["loss"] for r in rows),
    )


def _search_index(spec: SweepSpec, rows: Sequence[dict[str, Any]]) -> dict[str, dict[float, dict[int, dict]]]:
    """The finished search cells with a validation split: setting key -> lr -> seed -> row (built once per plan)."""
    search = set(spec.seeds[: spec.lr_search_seeds])
    index: dict[str, dict[float, dict[int, dict]]] = {}
    for row in rows:
        if row["seed"] in search and row.get("validation"):
            index.setdefault(setting_key(row["settings"]), {}).setdefault(row["lr"], {})[row["seed"]] = row
    return index


def _chosen_lr(spec: SweepSpec, by_lr: dict[float, dict[int, dict]]) -> float | None:
    """The lr the search seeds chose for one setting (its rows by lr and seed), or None while one is missing."""
    searched = len(spec.seeds[: spec.lr_search_seeds])
    if any(len(by_lr.get(lr, {})) < searched for lr in spec.lrs):
        return None
    scores = {lr: lr_score(by_lr[lr].values()) for lr in spec.lrs}
    return max(spec.lrs, key=lambda lr: (scores[lr], -spec.lrs.index(lr)))


def slots(spec: SweepSpec, rows: Sequence[dict[str, Any]] = ()) -> list[Cell | Waiting]:
    """The sweep's cells in order, with a :class:`Waiting` slot for each later-seed cell whose lr is open."""
    if spec.lr_search_seeds is None or spec.lr_search_seeds >= len(spec.seeds):
        return list(product(spec))
    search = set(spec.seeds[: spec.lr_search_seeds])
    index = _search_index(spec, rows)
    out: list[Cell | Waiting] = []
    for cell in product(spec):
        if cell.seed in search:
            out.append(cell)
        elif cell.train.lr == spec.lrs[0]:
            lr = _chosen_lr(spec, index.get(setting_key(cell.settings()), {}))
            out.append(Waiting(cell) if lr is None else replace(cell, train=replace(cell.train, lr=lr)))
    return out


def plan_counts(plan: Sequence[Cell | Waiting], done: set[str]) -> tuple[int, int, int]:
    """``(finished, to run, waiting)`` of a plan, given the finished cell ids."""
    finished = sum(isinstance(c, Cell) and c.id in done for c in plan)
    waiting = sum(isinstance(c, Waiting) for c in plan)
    return finished, len(plan) - finished - waiting, waiting


def cells(spec: SweepSpec, rows: Sequence[dict[str, Any]] = ()) -> list[Cell]:
    """The cells that can run now: every cell of ``spec`` but the waiting ones (:func:`slots`)."""
    return [slot for slot in slots(spec, rows) if isinstance(slot, Cell)]


def _grid_key(settings: Any) -> tuple[str, float, int] | None:
    """A cell's place in a spec's full grid whatever the device: its setting, lr and seed (None: no settings)."""
    if not isinstance(settings, dict) or not {"train", "config"} <= settings.keys():
        return None
    return setting_key(settings), settings["train"]["lr"], settings["train"]["seed"]


def rows_of_spec(spec: SweepSpec, rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The rows that are cells of ``spec``'s full grid (every lr and seed) run on any device (the first
    line of each id, in order), and how many rows are not. A row run on another device is another cell
    (its id differs), but it still counts in the lr choice of :func:`slots` and in the report."""
    grid = {_grid_key(cell.settings()) for cell in product(spec)}
    ours = [row for row in rows if _grid_key(row.get("settings")) in grid]
    kept: dict[str, dict[str, Any]] = {}
    for row in ours:
        kept.setdefault(row["id"], row)
    return list(kept.values()), len(rows) - len(ours)
