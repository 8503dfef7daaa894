"""``TrainArgs``: the frozen, validated hyper-parameters of one training run.

The ``malora-fx train`` flags are built from these fields and their
documentation (``malora_fx/cli/flags.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import MaloraError
from .data import parse_sampling


@dataclass(frozen=True)
class TrainArgs:
    """Training hyper-parameters (validated; messages name the bad value).

    Attributes:
        steps: optimizer steps (give steps or epochs, not both).
        epochs: passes over the data when steps is not given (default 1).
        batch_size: examples per micro-batch, over all ranks.
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: fraction of the steps spent in linear warm-up, 0 <= ratio < 1.
        max_length: longer sequences are truncated (and counted).
        task_sampling: proportional, uniform or temperature:T (tasks drawn with probability ∝ n_t^(1/T)).
        save_every: checkpoint every N steps (0: none).
        keep: checkpoints kept.
        resume: continue from the newest complete checkpoint.
        seed: seed of the batch schedule and adapter dropout.
        device: cpu, cuda or cuda:N.
        bf16: bf16 autocast (CUDA, or a CPU with bf16 kernels: AVX512-BF16 or AMX).
        max_grad_norm: gradient-norm clipping threshold.
    """

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_length: int = 512
    task_sampling: str = "proportional"
    save_every: int = 0
    keep: int = 2
    resume: bool = False
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise MaloraError("steps and epochs: give one of them, not both")
        if self.steps is not None and self.steps < 1:
            raise MaloraError(f"steps: {self.steps} must be >= 1")
        if self.epochs is not None and not self.epochs > 0:
            raise MaloraError(f"epochs: {self.epochs} must be > 0")
        for name in ("batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise MaloraError(f"{name}: {getattr(self, name)} must be >= 1")
        if not self.lr > 0:
            raise MaloraError(f"learning rate: {self.lr} must be > 0")
        if self.weight_decay < 0:
            raise MaloraError(f"weight decay: {self.weight_decay} must be >= 0")
        if not 0 <= self.warmup_ratio < 1:
            raise MaloraError(f"warmup ratio: {self.warmup_ratio} is out of range; allowed: 0 <= ratio < 1")
        if self.save_every < 0:
            raise MaloraError(f"save_every: {self.save_every} must be >= 0 (0 = no checkpoints)")
        if self.keep < 1:
            raise MaloraError(f"keep: {self.keep} must be >= 1")
        if self.max_grad_norm <= 0:
            raise MaloraError(f"max_grad_norm: {self.max_grad_norm} must be > 0")
        parse_sampling(self.task_sampling)
        if not (self.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", self.device)):
            raise MaloraError(f"device: {self.device!r}; allowed: cpu, cuda, cuda:N")
