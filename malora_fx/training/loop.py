"""Training the adapters: ``malora_fx.training.loop.train`` / ``malora-fx train``.

``train(target, data, args)`` trains either

* a run directory (from ``malora-fx transform``): its ``adapter_config.json``
  names the base model and the method, its safetensors hold the initial
  adapters; the base model is loaded (with its tokenizer) and transformed, the
  adapters are loaded, and everything is written into the run directory; or
* an adapted ``torch.fx.GraphModule`` (from ``malora_fx.transform``), trained
  in place (its adapters; the base stays frozen); ``tokenizer`` is required,
  and files are written only when ``out_dir`` is given.

Written (run directory or ``out_dir``, rank 0 only): ``checkpoints/step-NNNNNNNN/``
every ``save_every`` steps, the newest ``keep`` kept (:mod:`.checkpoint`);
``metrics.jsonl``, one row per step, cut back to the checkpoint on resume
(:mod:`.logs`); the trained adapters and ``loss.png`` at the end.

The batch schedule is a pure function of the data and the seed, the global RNG
is seeded with ``seed`` just before the first step and checkpointed, so the
data position of a resumed run is its step number and a resumed run ends
bit-identical (CPU) to one never interrupted; resuming checks a fingerprint of
the data and settings. The step is :mod:`.step`, AdamW and the warm-up + cosine
schedule :mod:`.schedule`, data parallelism (``torchrun``) :mod:`.distributed`.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx

from ..adapters.config import MALoRAConfig
from ..adapters.files import config_from_file, load_adapters, save_adapters
from ..adapters.transform import freeze_base, get_config, set_adapters_training, trainable_parameters, transform
from ..errors import MaloraError
from ..graph.move import move_to_device
from ..graph.sources import load_model
from .args import TrainArgs
from .checkpoint import (
    latest_checkpoint,
    load_optimizer_tensors,
    read_checkpoint,
    restore_rng,
    save_checkpoint,
)
from .data import Example, collate, encode_all, pad_id, plan_batches
from .distributed import Dist, init_distributed
from .inputs import Data, check_checkpoints, read_examples, resolve_target, run_fingerprint
from .logs import METRICS, MetricsFile, Progress, plot_losses
from .schedule import make_optimizer, total_steps
from .step import MicroBatches, train_step

__all__ = ["Run", "TrainArgs", "TrainResult", "prepare", "train"]


@dataclass
class TrainResult:
    run_dir: Path | None  # where files were written (None: a GraphModule trained without out_dir)
    steps: int
    final_loss: float
    metrics: list[dict[str, Any]]  # the rows of metrics.jsonl (eval row last, when evaluated)
    gm: fx.GraphModule  # the trained model


@dataclass
class Run:
    """A prepared run (see :func:`prepare`): :meth:`step` is one optimizer step, :meth:`loop` the whole run."""

    gm: fx.GraphModule
    tokenizer: Any
    args: TrainArgs
    config: MALoRAConfig
    dist: Dist
    batches: MicroBatches
    total_steps: int
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    fingerprint: str
    out_dir: Path | None
    base_model: str | None
    eval_examples: list[Example] | None
    progress: bool
    say: Callable[[str], None]
    start_step: int = 0

    def step(self, step: int) -> dict[str, Any]:
        return train_step(
            self.gm,
            step,
            self.batches(step),
            params=self.optimizer.param_groups[0]["params"],
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            args=self.args,
            aux_loss_coef=self.config.aux_loss_coef,
            dist=self.dist,
        )

    def resume(self) -> None:
        ckpt = latest_checkpoint(self.out_dir) if self.out_dir is not None else None
        if ckpt is None:
            raise MaloraError(f"resume: no complete checkpoint in {self.out_dir}")
        state, optim, rng = read_checkpoint(ckpt)
        if state.get("fingerprint") != self.fingerprint:
            raise MaloraError(f"resume: {ckpt} was made with other data or settings; resume with the same ones")
        load_adapters(self.gm, ckpt)
        load_optimizer_tensors(self.optimizer, optim)
        restore_rng(rng)
        self.start_step = state["step"]
        with warnings.catch_warnings():  # replaying the schedule before any optimizer step is intended
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            for _ in range(self.start_step):
                self.scheduler.step()
        self.say(f"resuming from {ckpt.name} (step {self.start_step} of {self.total_steps})")

    def loop(self) -> TrainResult:
        args = self.args
        out = self.out_dir if self.dist.main else None  # only rank 0 writes
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        log = MetricsFile(self.out_dir / METRICS) if self.out_dir is not None else None
        metrics = log.until(self.start_step, rewrite=self.dist.main) if log else []
        bar = Progress(self.total_steps, self.start_step, self.progress and self.dist.main)
        for step in range(self.start_step, self.total_steps):
            row = self.step(step)
            metrics.append(row)
            if out is not None and log is not None:
                log.append(row)
            bar.update(step, row)
            done = step + 1
            if out is not None and args.save_every and (done % args.save_every == 0 or done == self.total_steps):
                self._save(out, done)
        if out is not None:
            save_adapters(self.gm, out, base_model=self.base_model)
        if self.eval_examples and self.dist.main:
            metrics.append(self._evaluate(self.eval_examples))
            if log is not None and out is not None:
                log.append(metrics[-1])
        if out is not None:
            plot_losses(metrics, out / "loss.png")
        final = next((r["loss"] for r in reversed(metrics) if "loss" in r), float("nan"))
        return TrainResult(self.out_dir, self.total_steps, final, metrics, self.gm)

    def _save(self, out: Path, step: int) -> None:
        state = {"fingerprint": self.fingerprint, "total_steps": self.total_steps, "args": asdict(self.args)}
        save_checkpoint(
            out,
            step,
            optimizer=self.optimizer,
            state=state,
            keep=self.args.keep,
            write_adapters=lambda d: save_adapters(self.gm, d, base_model=self.base_model),
        )

    def _evaluate(self, examples: list[Example]) -> dict[str, Any]:
        from .evaluate import task_losses

        set_adapters_training(self.gm, False)
        losses = task_losses(
            lambda ids, mask: self.gm(input_ids=ids, attention_mask=mask).logits,
            self.tokenizer,
            examples,
            self.args.max_length,
            self.args.batch_size,
            self.args.device,
        )
        set_adapters_training(self.gm, True)
        self.say("eval loss: " + ", ".join(f"{t} {v['loss']:.4f}" for t, v in losses.items()))
        return {"step": self.total_steps, "eval_loss": losses}


def train(
    target: str | os.PathLike | fx.GraphModule,
    data: Data,
    args: TrainArgs | None = None,
    *,
    tokenizer: Any = None,
    out_dir: str | os.PathLike | None = None,
    eval_data: Data | None = None,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train the adapters of a run directory, or of an adapted GraphModule in place.

    ``data`` and ``eval_data`` are JSONL paths or lists of
    :class:`malora_fx.training.data.Example`. A GraphModule needs ``tokenizer``;
    its files (checkpoints, ``metrics.jsonl``, adapters, ``loss.png``) go to
    ``out_dir``, which ``save_every`` and ``resume`` require.

    Example:
        >>> train("runs/smol", "data/train.jsonl", TrainArgs(steps=200, batch_size=8, lr=1e-3))
        >>> train(gm, examples, TrainArgs(steps=50), tokenizer=tok).gm   # the same gm, trained
    """
    return prepare(
        target, data, args, tokenizer=tokenizer, out_dir=out_dir, eval_data=eval_data, progress=progress, say=say
    ).loop()


def prepare(
    target: str | os.PathLike | fx.GraphModule,
    data: Data,
    args: TrainArgs | None = None,
    *,
    tokenizer: Any = None,
    out_dir: str | os.PathLike | None = None,
    eval_data: Data | None = None,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
) -> Run:
    """Everything :func:`train` does before the first step (resume included); see :class:`Run`."""
    args = args or TrainArgs()
    say = say or (lambda message: print(f"malora-fx: {message}", file=sys.stderr, flush=True))
    gm, adapter_file, out = resolve_target(target, args, tokenizer, out_dir)
    if out is not None:
        check_checkpoints(out, args.resume)
    examples = read_examples(data, "data")
    eval_examples = read_examples(eval_data, "eval_data") if eval_data else None
    dist = init_distributed(args.device)
    if args.batch_size % dist.world:
        raise MaloraError(f"batch size {args.batch_size} is not divisible by the {dist.world} ranks")
    fingerprint = run_fingerprint(args, data, examples)
    if not dist.main:
        say = lambda message: None  # noqa: E731
    if adapter_file is not None:
        say(f"loading base model {adapter_file['base_model']}")
        loaded = load_model(adapter_file["base_model"])
        if loaded.tokenizer is None:
            raise MaloraError(f"base model {adapter_file['base_model']!r} has no tokenizer; cannot train on text")
        tokenizer = loaded.tokenizer
    pad = pad_id(tokenizer)
    encoded, truncated = encode_all(examples, tokenizer, args.max_length)
    if truncated:
        say(f"{truncated} of {len(encoded)} examples longer than max_length {args.max_length} were truncated")
    total = total_steps(args, len(encoded))
    schedule = plan_batches(
        encoded,
        batch_size=args.batch_size,
        num_batches=total * args.grad_accum,
        sampling=args.task_sampling,
        seed=args.seed,
    )
    model: fx.GraphModule
    if adapter_file is not None and out is not None:  # a run directory
        config = config_from_file(adapter_file)
        say(f"capturing and transforming ({config.method}, {len(adapter_file['sites'])} sites)")
        example = collate([encoded[i] for i in schedule[0][:2]], pad)
        model = transform(loaded.model, config, {k: example[k] for k in ("input_ids", "attention_mask")})
        load_adapters(model, out)
    elif gm is not None:  # a GraphModule held by the caller
        model = gm
        config = get_config(model)
        freeze_base(model)
    else:  # pragma: no cover - _target returns one of the two forms
        raise AssertionError("unreachable")
    move_to_device(model, args.device)  # a captured graph keeps its capture device in its nodes
    set_adapters_training(model, True)
    optimizer, scheduler = make_optimizer(trainable_parameters(model), args, total)
    torch.manual_seed(args.seed)
    run = Run(
        model,
        tokenizer,
        args,
        config,
        dist,
        MicroBatches(encoded, schedule, pad, args.batch_size, args.grad_accum, dist),
        total,
        optimizer,
        scheduler,
        fingerprint,
        out,
        adapter_file["base_model"] if adapter_file is not None else None,
        eval_examples,
        progress,
        say,
    )
    if args.resume:
        run.resume()
    return run
