"""Which cells a sweep run takes: another device (``--device``), some methods (``--methods``), some
suites (``--suites``), some seeds (``--seeds``), one shard of N (``--shard``). Each keeps the cells'
ids, except the device, which is a train setting."""

from __future__ import annotations

import dataclasses
import re
from typing import Protocol, TypeVar

from ..errors import MaloraError
from .args import TrainArgs
from .sweep_spec import SweepSpec

__all__ = ["only_seeds", "parse_seeds", "parse_shard", "shard_cells", "with_device", "with_methods", "with_suites"]

Slot = TypeVar("Slot")


class _Seeded(Protocol):
    @property
    def seed(self) -> int: ...


Seeded = TypeVar("Seeded", bound=_Seeded)


def with_device(spec: SweepSpec, device: str) -> SweepSpec:
    """``spec`` with every cell trained and evaluated on ``device`` (cpu, cuda or cuda:N).

    The device is a train setting, so it is part of each cell's id: cells run on another device are
    other cells (their speed differs, and their numbers may in the last digits)."""
    TrainArgs(device=device)  # its check: cpu, cuda or cuda:N
    if device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise MaloraError(f"device: {device!r}: torch {torch.__version__} sees no CUDA device; allowed here: cpu")
    return dataclasses.replace(spec, train={**spec.train, "device": device})


def with_methods(spec: SweepSpec, labels: str) -> SweepSpec:
    """``spec`` cut to the comma-separated method ``labels`` (its cells keep their ids)."""
    chosen = [label.strip() for label in labels.split(",") if label.strip()]
    unknown = [label for label in chosen if label not in spec.methods]
    if not chosen or unknown:
        raise MaloraError(
            f"methods: {(unknown[0] if unknown else labels)!r} is not a method of the spec; "
            f"allowed: {', '.join(spec.methods)}"
        )
    return dataclasses.replace(spec, methods={label: spec.methods[label] for label in spec.methods if label in chosen})


def with_suites(spec: SweepSpec, names: str) -> SweepSpec:
    """``spec`` cut to the comma-separated suite ``names`` (its cells keep their ids)."""
    chosen = [name.strip() for name in names.split(",") if name.strip()]
    known = [suite.name for suite in spec.suites]
    unknown = [name for name in chosen if name not in known]
    if not chosen or unknown:
        raise MaloraError(
            f"suites: {(unknown[0] if unknown else names)!r} is not a suite of the spec; allowed: {', '.join(known)}"
        )
    return dataclasses.replace(spec, suites=tuple(s for s in spec.suites if s.name in chosen))


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (1 <= I <= N) -> ``(I, N)``; anything else is a one-line :class:`MaloraError`."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise MaloraError(f"shard: {text!r}; expected I/N with 1 <= I <= N, e.g. 2/4")
    return int(match[1]), int(match[2])


def shard_cells(all_cells: list[Slot], shard: tuple[int, int] | None) -> list[Slot]:
    """Shard ``I/N``'s share of the cells (or of :func:`~.sweep_plan.slots`): every N-th from the I-th,
    so that each shard gets every method and the early seeds first. The N shards are disjoint and
    together cover every cell."""
    if shard is None:
        return all_cells
    index, count = shard
    return all_cells[index - 1 :: count]


def parse_seeds(spec: SweepSpec, text: str) -> tuple[int, ...]:
    """``"1,2"`` -> ``(1, 2)``, each one of the spec's seeds; anything else is a one-line :class:`MaloraError`."""
    allowed = ", ".join(str(s) for s in spec.seeds)
    items = [item.strip() for item in text.split(",") if item.strip()]
    for item in items or [text]:
        if not item.isdigit() or int(item) not in spec.seeds:
            raise MaloraError(f"seeds: {item!r} is not a seed of the spec; allowed: {allowed}")
    return tuple(int(item) for item in items)


def only_seeds(plan: list[Seeded], seeds: tuple[int, ...] | None) -> list[Seeded]:
    """The cells (or slots) of ``plan`` with one of ``seeds`` (``None``: all). The spec keeps every seed,
    so that ``lr_search_seeds`` still names its first seeds: ``--seeds 1,2`` runs the later seeds of a
    sweep whose search cells ran elsewhere (another machine, another device)."""
    return plan if seeds is None else [slot for slot in plan if slot.seed in seeds]
