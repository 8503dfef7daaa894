"""Multi-task training of a transformed model: ``malora_fx.train`` / ``malora-fx train``.

A run directory comes from ``malora-fx transform``: its ``adapter_config.json``
names the base model and the method, its safetensors hold the initial
adapters. Training writes into it

* ``checkpoints/step-NNNNNNNN/`` every ``save_every`` steps (see
  :mod:`malora_fx.train.checkpoint`), the newest ``keep`` kept;
* ``metrics.jsonl``, one JSON object per step (loss, aux loss, lr, grad norm,
  tokens, tokens/s); on resume the lines past the checkpoint are dropped;
* the trained adapters (``adapter_model.safetensors``) and ``loss.png`` at the end.

The step: for each of ``grad_accum`` micro-batches of ``batch_size`` examples
(split evenly over data-parallel ranks), LM cross-entropy summed over response
tokens and divided by the step's response-token count, plus
``aux_loss_coef`` × the routers' load-balancing loss averaged over
micro-batches; AdamW with weight decay, linear warm-up then cosine decay to 0,
gradient-norm clipping, bf16 autocast when asked. The batch schedule is a pure
function of the data and the seed, so the data position of a resumed run is
its step number, and a resumed run ends bit-identical (CPU) to one that was
never interrupted.

Data parallel: under ``torchrun`` (``WORLD_SIZE`` > 1) every rank takes its
slice of each micro-batch; gradients are summed with ``all_reduce`` (gloo on
CPU, nccl on CUDA) and only rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..adapters.files import (
    config_from_file,
    load_adapters,
    read_adapter_config,
    save_adapters,
)
from ..adapters.transform import (
    aux_loss,
    set_adapters_training,
    trainable_parameters,
    transform,
)
from ..errors import MaloraError
from ..graph.sources import load_model
from .args import TrainArgs
from .checkpoint import (
    complete_checkpoints,
    latest_checkpoint,
    load_optimizer_tensors,
    read_checkpoint,
    restore_rng,
    save_checkpoint,
)
from .data import (
    IGNORE,
    Encoded,
    collate,
    encode_all,
    pad_id,
    plan_batches,
    read_jsonl,
)

logger = logging.getLogger(__name__)

METRICS = "metrics.jsonl"


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    metrics: list[dict[str, Any]]


# ---------------------------------------------------------------- helpers


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def label_tokens(example: Encoded) -> int:
    """Response tokens that are predicted (labels shifted by one)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            tensor = tensor.clone()
            dist.all_reduce(tensor)
        return tensor


def _init_distributed(device: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size())


class Progress:
    """A one-line progress bar on stderr (a line per 5 % when not a terminal)."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total, self.start, self.enabled = total, start, enabled
        self.began = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.every = max(1, total // 20)

    def update(self, step: int, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        done = step + 1
        elapsed = time.perf_counter() - self.began
        eta = elapsed / max(1, done - self.start) * (self.total - done)
        text = (f"step {done}/{self.total}  loss {row['loss']:.4f}  aux {row['aux_loss']:.4f}  "
                f"{row['tokens_per_s']:.0f} tok/s  ETA {_clock(eta)}")
        if self.tty:
            print("\r" + text, end="\n" if done == self.total else "", file=sys.stderr, flush=True)
        elif done % self.every == 0 or done == self.total:
            print(text, file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------- the run


class Trainer:
    """One training run; :func:`train` is the public entry point."""

    def __init__(self, run_dir: str | Path, data: str | Path, args: TrainArgs, eval_data: str | Path | None,
                 progress: bool, say: Callable[[str], None]) -> None:
        self.run_dir, self.args, self.say = Path(run_dir), args, say
        self.adapter_file = read_adapter_config(self.run_dir)
        self._check_checkpoints()
        self.examples = read_jsonl(data)
        self.eval_examples = read_jsonl(eval_data) if eval_data else None
        self.dist = _init_distributed(args.device)
        if args.batch_size % self.dist.world:
            raise MaloraError(f"batch size {args.batch_size} is not divisible by the {self.dist.world} ranks")
        self.fingerprint = self._fingerprint(data)
        self.progress_enabled = progress and self.dist.main

    def _check_checkpoints(self) -> None:
        existing = complete_checkpoints(self.run_dir, verify=False)
        if self.args.resume and latest_checkpoint(self.run_dir) is None:
            raise MaloraError(f"--resume: no complete checkpoint in {self.run_dir / 'checkpoints'}")
        if not self.args.resume and existing:
            raise MaloraError(f"{self.run_dir} already has checkpoints ({existing[-1].name}); pass --resume to "
                              "continue, or transform into a new run directory")

    def _fingerprint(self, data: str | Path) -> str:
        keys = asdict(self.args)
        for volatile in ("resume", "device", "save_every", "keep"):
            keys.pop(volatile)
        keys["data"] = _file_digest(Path(data))
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]

    # -- setup
    def setup(self) -> None:
        args = self.args
        self.say(f"loading base model {self.adapter_file['base_model']}")
        loaded = load_model(self.adapter_file["base_model"])
        if loaded.tokenizer is None:
            raise MaloraError(f"base model {self.adapter_file['base_model']!r} has no tokenizer; cannot train on text")
        self.tokenizer = loaded.tokenizer
        self.pad_id = pad_id(self.tokenizer)
        self.encoded, truncated = encode_all(self.examples, self.tokenizer, args.max_length)
        if truncated:
            self.say(f"{truncated} of {len(self.encoded)} examples longer than --max-length {args.max_length} were truncated")
        per_step = args.batch_size * args.grad_accum
        epochs = 1.0 if args.epochs is None else args.epochs
        self.total_steps = args.steps or max(1, math.ceil(epochs * len(self.encoded) / per_step))
        self.schedule = plan_batches(self.encoded, batch_size=args.batch_size,
                                     num_batches=self.total_steps * args.grad_accum,
                                     sampling=args.task_sampling, seed=args.seed)
        self.config = config_from_file(self.adapter_file)
        self.say(f"capturing and transforming ({self.config.method}, {len(self.adapter_file['sites'])} sites)")
        example = collate([self.encoded[i] for i in self.schedule[0][:2]], self.pad_id)
        self.gm = transform(loaded.model, self.config, {k: example[k] for k in ("input_ids", "attention_mask")})
        load_adapters(self.gm, self.run_dir)
        self.gm.to(args.device)
        set_adapters_training(self.gm, True)
        self.params = trainable_parameters(self.gm)
        self.optimizer = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=args.weight_decay)
        self.warmup = int(args.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, self.warmup))
        self.start_step = 0
        torch.manual_seed(args.seed)
        if args.resume:
            self._resume()

    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.run_dir)
        state, optim, rng = read_checkpoint(ckpt)
        if state.get("fingerprint") != self.fingerprint:
            raise MaloraError(f"--resume: {ckpt} was made with other data or settings; resume with the same ones")
        load_adapters(self.gm, ckpt)
        load_optimizer_tensors(self.optimizer, optim)
        restore_rng(rng)
        self.start_step = state["step"]
        for _ in range(self.start_step):
            self.scheduler.step()
        self.say(f"resuming from {ckpt.name} (step {self.start_step} of {self.total_steps})")

    # -- one step
    def _micro_batches(self, step: int):
        args, world, rank = self.args, self.dist.world, self.dist.rank
        batches = self.schedule[step * args.grad_accum:(step + 1) * args.grad_accum]
        tokens = sum(label_tokens(self.encoded[i]) for batch in batches for i in batch)
        share = args.batch_size // world
        for batch in batches:
            mine = batch[rank * share:(rank + 1) * share]
            yield collate([self.encoded[i] for i in mine], self.pad_id), max(tokens, 1)

    def step(self, step: int) -> dict[str, Any]:
        args, device = self.args, self.args.device
        started = time.perf_counter()
        ce_total = torch.zeros((), device=device)
        aux_total = torch.zeros((), device=device)
        seen = 0
        reduce = self.dist.all_reduce if self.dist.world > 1 else None
        for batch, step_tokens in self._micro_batches(step):
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=args.bf16):
                logits = self.gm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                 ignore_index=IGNORE, reduction="sum") / step_tokens
            aux = aux_loss(self.gm, batch["attention_mask"], all_reduce=reduce).to(ce.device) / args.grad_accum
            (ce + self.config.aux_loss_coef * aux).backward()
            ce_total += ce.detach()
            aux_total += aux.detach()
            seen += int(batch["attention_mask"].sum())
        if self.dist.world > 1:
            for p in self.params:
                p.grad = self.dist.all_reduce(p.grad)
            ce_total, aux_total = self.dist.all_reduce(ce_total), self.dist.all_reduce(aux_total)
            seen = int(self.dist.all_reduce(torch.tensor(seen, device=device)))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, args.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        return {"step": step + 1, "loss": float(ce_total), "aux_loss": float(aux_total), "lr": lr,
                "grad_norm": float(grad_norm), "tokens": seen, "tokens_per_s": seen / max(elapsed, 1e-9),
                "seconds": elapsed}

    # -- the loop
    def run(self) -> TrainResult:
        args = self.args
        metrics = self._metrics_until(self.start_step)
        bar = Progress(self.total_steps, self.start_step, self.progress_enabled)
        for step in range(self.start_step, self.total_steps):
            row = self.step(step)
            metrics.append(row)
            if self.dist.main:
                with open(self.run_dir / METRICS, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
            bar.update(step, row)
            done = step + 1
            if args.save_every and (done % args.save_every == 0 or done == self.total_steps) and self.dist.main:
                self._save(done)
        if self.dist.main:
            save_adapters(self.gm, self.run_dir, base_model=self.adapter_file["base_model"])
            if self.eval_examples:
                self._record_eval(metrics)
            plot_losses(metrics, self.run_dir / "loss.png")
        final = next((r["loss"] for r in reversed(metrics) if "loss" in r), float("nan"))
        return TrainResult(self.run_dir, self.total_steps, final, metrics)

    def _save(self, step: int) -> None:
        state = {"fingerprint": self.fingerprint, "total_steps": self.total_steps, "args": asdict(self.args)}
        save_checkpoint(self.run_dir, step, optimizer=self.optimizer, state=state, keep=self.args.keep,
                        write_adapters=lambda d: save_adapters(self.gm, d, base_model=self.adapter_file["base_model"]))

    def _metrics_until(self, step: int) -> list[dict[str, Any]]:
        """Metrics rows of steps ``<= step``; the file is rewritten without later rows."""
        path = self.run_dir / METRICS
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if "step" in r and r["step"] <= step]
        if self.dist.main:
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def _record_eval(self, metrics: list[dict[str, Any]]) -> None:
        from .evaluate import task_losses

        set_adapters_training(self.gm, False)
        losses = task_losses(self.gm_logits, self.tokenizer, self.eval_examples, self.args.max_length,
                             self.args.batch_size, self.args.device)
        set_adapters_training(self.gm, True)
        row = {"step": self.total_steps, "eval_loss": losses}
        with open(self.run_dir / METRICS, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        self.say("eval loss: " + ", ".join(f"{t} {v['loss']:.4f}" for t, v in losses.items()))

    def gm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.gm(input_ids=input_ids, attention_mask=attention_mask).logits


def plot_losses(metrics: list[dict[str, Any]], path: Path) -> None:
    """Draw training loss (and aux loss) against step to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in metrics if "loss" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="LM loss (response tokens)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    aux = [r["aux_loss"] for r in rows]
    if any(aux):
        twin = ax.twinx()
        twin.plot([r["step"] for r in rows], aux, color="tab:orange", alpha=0.6, label="load-balancing loss")
        twin.set_ylabel("aux loss")
        twin.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.set_title(f"training loss ({path.parent.name})")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def train(run_dir: str | Path, data: str | Path, args: TrainArgs | None = None, *, eval_data: str | Path | None = None,
          progress: bool = True, say: Callable[[str], None] | None = None) -> TrainResult:
    """Train the adapters of ``run_dir`` on the JSONL ``data``.

    Example:
        >>> train("runs/smol", "data/train.jsonl", TrainArgs(steps=200, batch_size=8, lr=1e-3))
    """
    say = say or (lambda message: print(f"malora-fx: {message}", file=sys.stderr, flush=True))
    trainer = Trainer(run_dir, data, args or TrainArgs(), eval_data, progress, say)
    if not trainer.dist.main:
        say = lambda message: None  # noqa: E731
        trainer.say = say
    trainer.setup()
    return trainer.run()
