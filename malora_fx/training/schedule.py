"""How long a run is and how fast it learns: the step count, AdamW and the LR schedule.

* :func:`total_steps`: ``steps`` when given, else ``ceil(epochs × examples /
  (batch_size × grad_accum))`` (one epoch by default), at least 1.
* :func:`lr_factor`: linear warm-up to 1 over the first ``warmup`` steps, then
  cosine decay to 0 at ``total``.
* :func:`make_optimizer`: AdamW over the given parameters (``lr``,
  ``weight_decay``) and a ``LambdaLR`` scheduler applying :func:`lr_factor`
  with ``warmup = int(warmup_ratio × total)``. The scheduler is stepped once
  per optimizer step, so a resumed run replays it by stepping it ``step`` times.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .args import TrainArgs


def total_steps(args: TrainArgs, num_examples: int) -> int:
    """Optimizer steps of a run over ``num_examples`` examples."""
    if args.steps:
        return args.steps
    epochs = 1.0 if args.epochs is None else args.epochs
    return max(1, math.ceil(epochs * num_examples / (args.batch_size * args.grad_accum)))


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    args: TrainArgs,
    total: int,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``params`` and its warm-up + cosine scheduler for a run of ``total`` steps."""
    optimizer = torch.optim.AdamW(list(params), lr=args.lr, weight_decay=args.weight_decay)
    warmup = int(args.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    return optimizer, scheduler
