"""One optimizer step over the micro-batches of a planned batch schedule.

:class:`MicroBatches` turns step ``i`` of the schedule (from
:func:`malora_fx.training.data.plan_batches`) into its ``grad_accum`` collated
micro-batches, each cut to this rank's equal share, together with the number
of response tokens the whole step predicts (all micro-batches, all ranks).

:func:`train_step` runs them: per micro-batch, LM cross-entropy summed over
response tokens and divided by the step's response-token count, plus
``aux_loss_coef`` × the routers' load-balancing loss (global across ranks)
divided by ``grad_accum``; backward; gradients summed over ranks; norm
clipping; optimizer and scheduler step; gradients cleared. It returns the
metrics row ``{step, loss, aux_loss, lr, grad_norm, tokens, tokens_per_s,
response_tokens, response_tokens_per_s, seconds}`` (``step`` counts from 1,
``lr`` is the rate the step used). ``tokens`` counts every real token the
forward pass read (prompt and response, all ranks); ``response_tokens`` only
the ones the loss covers.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.transform import aux_loss
from .args import TrainArgs
from .data import IGNORE, Encoded, collate
from .distributed import Dist


def label_tokens(example: Encoded) -> int:
    """Response tokens that are predicted (labels shifted by one)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE)


@dataclass
class MicroBatches:
    """The micro-batches of each step of a batch schedule, as this rank sees them."""

    encoded: Sequence[Encoded]
    schedule: Sequence[Sequence[int]]
    pad_id: int
    batch_size: int
    grad_accum: int
    dist: Dist

    def __call__(self, step: int) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
        """``(collated batch, response tokens of the whole step)`` per micro-batch of ``step`` (from 0)."""
        batches = self.schedule[step * self.grad_accum : (step + 1) * self.grad_accum]
        tokens = sum(label_tokens(self.encoded[i]) for batch in batches for i in batch)
        share = self.batch_size // self.dist.world
        rank = self.dist.rank
        for batch in batches:
            mine = batch[rank * share : (rank + 1) * share]
            yield collate([self.encoded[i] for i in mine], self.pad_id), max(tokens, 1)


def train_step(
    gm: nn.Module,
    step: int,
    micro_batches: Iterable[tuple[dict[str, torch.Tensor], int]],
    *,
    params: Sequence[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    args: TrainArgs,
    aux_loss_coef: float,
    dist: Dist,
) -> dict[str, Any]:
    """Run optimizer step ``step`` (from 0) of ``gm`` over ``micro_batches``; returns its metrics row."""
    device = args.device
    started = time.perf_counter()
    ce_total = torch.zeros((), device=device)
    aux_total = torch.zeros((), device=device)
    seen = 0
    response = 0
    reduce = dist.all_reduce if dist.world > 1 else None
    for batch, step_tokens in micro_batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=args.bf16):
            logits = gm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ce = (
            F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1),
                batch["labels"][:, 1:].flatten(),
                ignore_index=IGNORE,
                reduction="sum",
            )
            / step_tokens
        )
        aux = aux_loss(gm, batch["attention_mask"], all_reduce=reduce).to(ce.device) / args.grad_accum
        (ce + aux_loss_coef * aux).backward()
        ce_total += ce.detach()
        aux_total += aux.detach()
        seen += int(batch["attention_mask"].sum())
        response = step_tokens  # the whole step's response tokens (all micro-batches, all ranks)
    if dist.world > 1:
        for p in params:
            if p.grad is not None:
                p.grad = dist.all_reduce(p.grad)
        ce_total, aux_total = dist.all_reduce(ce_total), dist.all_reduce(aux_total)
        seen = int(dist.all_reduce(torch.tensor(seen, device=device)))
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - started
    return {
        "step": step + 1,
        "loss": float(ce_total),
        "aux_loss": float(aux_total),
        "lr": lr,
        "grad_norm": float(grad_norm),
        "tokens": seen,
        "tokens_per_s": seen / max(elapsed, 1e-9),
        "response_tokens": response,
        "response_tokens_per_s": response / max(elapsed, 1e-9),
        "seconds": elapsed,
    }
