"""Shared pieces of the peer tools (``tools/peers/*.py``): machine line, data, lock-step training, tables.

Training a model that is not a malora-fx GraphModule (a PEFT ``PeftModel``, a model with
``mixlora`` injected) goes through :class:`PeerRun`, which reproduces what
``malora_fx.training.loop.prepare`` sets up for a GraphModule, with malora-fx's own public
pieces rather than copies of them:

* the examples are tokenised by ``encode_all`` (``format_prompt`` + response, loss on the response);
* the batch schedule is ``plan_batches(encoded, batch_size, steps × grad_accum, task_sampling, seed)``
  and a step's micro-batches come from ``MicroBatches`` (``collate``, right padding);
* the optimizer and schedule are ``make_optimizer`` (AdamW, linear warm-up then cosine, from
  ``TrainArgs``), the step count ``total_steps``;
* the global RNG is seeded with ``args.seed`` just before the first step, as ``prepare`` does;
* one step is ``malora_fx.training.step.train_step`` itself (summed response-token cross-entropy
  over the step's response tokens, backward, clipping at ``max_grad_norm``, optimizer and scheduler
  step), with ``aux_loss_coef = 0``: ``aux_loss`` finds no malora-fx router in a peer model and
  returns 0, so a peer trains without a load-balancing loss.

What :class:`PeerRun` leaves out of ``train``: checkpoints, ``metrics.jsonl``, the progress bar,
``torchrun`` (one process only) and resuming.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from malora_fx.training.args import TrainArgs
from malora_fx.training.data import Example, encode_all, pad_id, plan_batches, read_jsonl
from malora_fx.training.distributed import Dist
from malora_fx.training.evaluate import evaluate
from malora_fx.training.schedule import make_optimizer, total_steps
from malora_fx.training.step import MicroBatches, train_step
from malora_fx.training.suites import write_suite

sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # tools/: the CPU name as the benchmarks write it
from bench_train_step import cpu_name  # noqa: E402

TARGET_LIST = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = ",".join(TARGET_LIST)


# ----------------------------------------------------------------------------- machine


def versions(*packages: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", *packages):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def machine_info(*packages: str) -> dict[str, Any]:
    """Platform, CPU model, cores, torch threads (now) and package versions."""
    return {
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions(*packages),
    }


def machine_line(info: dict[str, Any], threads: dict[str, int] | None = None) -> str:
    """One line naming the machine; ``threads`` overrides the torch thread count per phase."""
    vers = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    if threads:
        used = ", ".join(f"{n} {phase}" for phase, n in threads.items())
    else:
        used = str(info["torch_threads"])
    return f"{info['platform']}, {info['cpu']}, {info['cores']} cores; torch threads: {used}; {vers}"


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])


# ----------------------------------------------------------------------------- data


def make_suite(suite: str, train: int, eval_: int, seed: int) -> tuple[list[Example], list[Example]]:
    """The built-in suite through malora-fx's own writer and reader (counts per task)."""
    with tempfile.TemporaryDirectory(prefix="peers-data-") as tmp:
        paths = write_suite(suite, tmp, train=train, eval=eval_, seed=seed)
        return read_jsonl(paths["train"]), read_jsonl(paths["eval"])


# ----------------------------------------------------------------------------- training


class PeerRun:
    """A run of a plain ``nn.Module`` (``model(input_ids=, attention_mask=).logits``) that sees what
    ``malora_fx.training.loop.prepare`` would give a GraphModule: same batches, optimizer, schedule, step."""

    def __init__(
        self, model: nn.Module, params: Sequence[torch.Tensor], tokenizer: Any, examples: Sequence[Example], args
    ) -> None:
        if args.grad_accum < 1 or args.bf16 or args.resume or args.save_every:
            raise ValueError("PeerRun: grad_accum >= 1, no bf16, no resume, no checkpoints")
        self.model, self.args = model, args
        self.params = list(params)
        encoded, _ = encode_all(examples, tokenizer, args.max_length)
        self.total_steps = total_steps(args, len(encoded))
        schedule = plan_batches(
            encoded,
            batch_size=args.batch_size,
            num_batches=self.total_steps * args.grad_accum,
            sampling=args.task_sampling,
            seed=args.seed,
        )
        self.dist = Dist()
        self.batches = MicroBatches(encoded, schedule, pad_id(tokenizer), args.batch_size, args.grad_accum, self.dist)
        self.optimizer, self.scheduler = make_optimizer(self.params, args, self.total_steps)
        model.to(args.device)
        torch.manual_seed(args.seed)

    def step(self, step: int) -> dict[str, Any]:
        return train_step(
            self.model,
            step,
            self.batches(step),
            params=self.params,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            args=self.args,
            aux_loss_coef=0.0,
            dist=self.dist,
        )


def lockstep(
    steppers: dict[str, Callable[[int], dict[str, Any]]], steps: int, say: Callable[[str], None] = print
) -> dict[str, list[dict[str, Any]]]:
    """Step every run once per step, the order rotating each step (so no run always goes first)."""
    names = list(steppers)
    rows: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for step in range(steps):
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            rows[name].append(steppers[name](step))
        if (step + 1) % 10 == 0 or step + 1 == steps:
            losses = "  ".join(f"{n} {rows[n][-1]['loss']:.4f} ({rows[n][-1]['seconds']:.2f}s)" for n in names)
            say(f"step {step + 1}/{steps}: {losses}")
    return rows


def step_ratio(rows: dict[str, list[dict[str, Any]]], num: str, den: str, skip: int) -> dict[str, float]:
    """Step time of ``num`` over ``den`` on the same batches: median of per-step ratios and ratio of sums."""
    a = [r["seconds"] for r in rows[num][skip:]]
    b = [r["seconds"] for r in rows[den][skip:]]
    return {
        "median_of_step_ratios": statistics.median(x / y for x, y in zip(a, b, strict=True)),
        "ratio_of_sums": sum(a) / sum(b),
        "median_step_s_" + num: statistics.median(a),
        "median_step_s_" + den: statistics.median(b),
        "steps_timed": len(a),
    }


def logits_fn_of(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits


def eval_table(
    model_fn, tokenizer, examples, args: TrainArgs, max_new_tokens: int | None, decoder=None
) -> dict[str, Any]:
    """malora-fx's ``evaluate``: per-task loss (``model_fn``) and greedy exact match (``decoder``'s KV
    cache when given, else ``model_fn`` without a cache)."""
    return evaluate(
        model_fn,
        tokenizer,
        examples,
        max_length=args.max_length,
        batch_size=args.batch_size,
        max_new_tokens=max_new_tokens,
        device=args.device,
        decoder=decoder,
    )


# ----------------------------------------------------------------------------- output


def quality_table(tables: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Markdown: one row per task, exact match and loss per model."""
    names = list(tables)
    tasks = [t for t in next(iter(tables.values())) if t != "average"] + ["average"]
    head = "| task | " + " | ".join(f"{n} EM | {n} loss" for n in names) + " |"
    lines = [head, "|---|" + "---|---|" * len(names)]
    for task in tasks:
        cells = []
        for n in names:
            row = tables[n][task]
            cells.append(f"{row['exact_match']:.3f} | {row['loss']:.4f}")
        label = f"**{task}**" if task == "average" else task
        lines.append(f"| {label} (n={int(tables[names[0]][task]['n'])}) | " + " | ".join(cells) + " |")
    return lines


def print_quality(tables: dict[str, dict[str, dict[str, float]]]) -> None:
    names = list(tables)
    print(f"{'task':<14}" + "".join(f"{n + ' EM':>16}{n + ' loss':>18}" for n in names))
    for task in [t for t in next(iter(tables.values())) if t != "average"] + ["average"]:
        print(
            f"{task:<14}"
            + "".join(f"{tables[n][task]['exact_match']:>16.3f}{tables[n][task]['loss']:>18.4f}" for n in names)
        )


def write_outputs(result: dict[str, Any], markdown: list[str], json_path: str | None, md_path: str | None) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {json_path}")
    if md_path:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text("\n".join(markdown) + "\n")
        print(f"wrote {md_path}")


def train_args_dict(args: TrainArgs) -> dict[str, Any]:
    return asdict(args)
