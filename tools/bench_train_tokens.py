"""Training throughput (tokens/s) of MALoRA vs MoLoRA vs LoRA over a real run.

Each variant is a run set up by ``malora_fx.training.loop.prepare`` on the same data (the
built-in ``inter`` suite) and the same base model (SmolLM2-135M by default):
real tokenised batches of varying length, AdamW, warm-up + cosine schedule,
aux loss. The three runs advance in lock-step (step i of A, then of B, then
of C, ...), so machine drift hits all of them alike. Reported: tokens/s over
all timed steps per variant, and the ratios MALoRA/MoLoRA and MALoRA/LoRA
(throughput: > 1 means MALoRA is faster).

    python tools/bench_train_tokens.py                      # 60 steps, batch 8
    python tools/bench_train_tokens.py --model tiny-llama --steps 200
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
from pathlib import Path

import torch

from malora_fx import MALoRAConfig, save_adapters, transform
from malora_fx.graph.sources import load_model
from malora_fx.training.loop import TrainArgs, prepare
from malora_fx.training.suites import write_suite

TARGETS = "q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj"
VARIANTS = {
    "malora": MALoRAConfig(method="malora", targets=TARGETS, rank=12, shared_rank=32),
    "molora": MALoRAConfig(method="molora", targets=TARGETS, rank=8),
    "lora": MALoRAConfig(method="lora", targets=TARGETS, rank=64),
}


def make_run(root: Path, name: str, model_name: str, model, config: MALoRAConfig) -> Path:
    """A run directory as ``malora-fx transform`` would write it."""
    gm = transform(model, config)
    run = root / name
    save_adapters(gm, run, base_model=model_name)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps not timed")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {args.device}"
    )

    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        write_suite("inter", root / "data", train=100, eval=1, seed=0)
        base = load_model(args.model).model
        trainers = {}
        for name, config in VARIANTS.items():
            run = make_run(root, name, args.model, base, config)
            targs = TrainArgs(
                steps=args.steps + args.warmup_steps, batch_size=args.batch_size, lr=1e-3, device=args.device
            )
            trainer = prepare(run, root / "data" / "train.jsonl", targs, progress=False, say=lambda m: None)
            trainers[name] = trainer
        tokens = {name: 0 for name in trainers}
        seconds = {name: 0.0 for name in trainers}
        for step in range(args.steps + args.warmup_steps):
            for name, trainer in trainers.items():
                row = trainer.step(step)
                if step >= args.warmup_steps:
                    tokens[name] += row["tokens"]
                    seconds[name] += row["seconds"]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rate = {name: tokens[name] / seconds[name] for name in trainers}
    print(
        f"\n{args.model}, {args.steps} timed steps (+{args.warmup_steps}) of batch {args.batch_size}, "
        f"inter suite, lock-step; targets {TARGETS}"
    )
    print(f"{'variant':<8} {'tokens':>9} {'seconds':>9} {'tokens/s':>10}")
    for name in trainers:
        print(f"{name:<8} {tokens[name]:>9} {seconds[name]:>9.1f} {rate[name]:>10.1f}")
    ratios = {"malora/molora": rate["malora"] / rate["molora"], "malora/lora": rate["malora"] / rate["lora"]}
    print(f"\nthroughput MALoRA / MoLoRA = {ratios['malora/molora']:.3f}x  (paper: ~1.2x)")
    print(f"throughput MALoRA / LoRA   = {ratios['malora/lora']:.3f}x  (paper: ~0.93x)")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"tokens_per_s": rate, "ratios": ratios, "settings": vars(args)}, indent=2)
        )


if __name__ == "__main__":
    main()
