"""PEFT LoRA vs malora-fx's own ``lora`` method on SmolLM2-135M: same data, batches, steps, optimizer.

Both adapters are LoRA r64, alpha 128 (scale 2), dropout 0, on q_proj,k_proj,v_proj,gate_proj,
up_proj,down_proj, trained on one built-in suite (``write_suite``; counts per task) with the
same ``TrainArgs`` (AdamW, linear warm-up then cosine, clipping at 1.0):

* **ours**: ``malora_fx.transform(model, MALoRAConfig(method="lora", rank=64))`` trained by
  ``malora_fx.training.loop.prepare`` — everything ``malora_fx.train`` does before its loop — and
  ``Run.step``, the step ``train`` runs (no files are written, as ``train(gm, ..., out_dir=None)``);
* **peft**: ``peft.get_peft_model`` on a second copy of the base, trained by
  ``tools/peers/_common.PeerRun``: malora-fx's ``encode_all`` / ``plan_batches`` / ``MicroBatches`` /
  ``make_optimizer`` and its ``train_step`` itself, so it reads the same batches in the same
  order with the same loss, clipping, optimizer and schedule. What differs from ``train``: no
  checkpoints, metrics file, progress bar, ``torchrun`` or resume; PEFT's model is eager
  ``transformers`` code (``model.train()``), ours a ``torch.export`` graph.

The two runs advance in lock-step (step i of one, then of the other, the order swapping every
step), so the per-step time ratio compares the same batch under the same machine load; the first
``--timing-skip`` steps are left out of it. ``--init copy`` (default) copies our initial A (B is 0
in both) into PEFT's ``lora_A``, so both start from the same point and the per-step loss
difference measures how far the two implementations drift apart (float rounding only, if they
agree); ``--init peft`` keeps PEFT's own Kaiming init (seeded with ``--seed``), an independent
start drawn from the same distribution.

Quality: malora-fx's ``evaluate`` on the eval split (per-task response loss from
``logits_fn`` = the model's logits; exact match by greedy decoding). Greedy decoding uses the KV
cache (``cached_decoder``: PEFT's model run eagerly with its cache; ours captured with its cache
and the trained adapters copied in, what ``malora-fx eval`` does); ``--no-cache`` decodes through
``logits_fn`` instead (same tokens, several times slower). ``--base`` adds the base model (PEFT's
``disable_adapter``).

    python tools/peers/peft_lora.py --json tools/results/peers_peft.json \\
        --markdown tools/results/peers_peft.md                      # 60 steps of 8, ~10 min on 2 cores
    python tools/peers/peft_lora.py --suite inter --steps 300 --train 200 --eval 20 \\
        --init peft --base --threads 2                             # a longer run, ~1 h on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    TARGET_LIST,
    TARGETS,
    PeerRun,
    command_line,
    eval_table,
    lockstep,
    logits_fn_of,
    machine_info,
    machine_line,
    make_suite,
    print_quality,
    quality_table,
    step_ratio,
    train_args_dict,
    write_outputs,
)

from malora_fx import MALoRAConfig, adapter_layers, set_adapters_training, transform  # noqa: E402
from malora_fx.graph.sources import load_model  # noqa: E402
from malora_fx.training.args import TrainArgs  # noqa: E402
from malora_fx.training.eval_decoder import cached_decoder  # noqa: E402
from malora_fx.training.loop import prepare  # noqa: E402


def build_peft(model, rank: int, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # PEFT draws lora_A from the global RNG
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGET_LIST, bias="none", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def copy_init(gm, peft_model) -> int:
    """Copy our initial A and B into PEFT's ``lora_A``/``lora_B`` (same sites); returns the sites copied."""
    inner = peft_model.get_base_model()
    layers = adapter_layers(gm)
    with torch.no_grad():
        for fqn, layer in layers.items():
            module = inner.get_submodule(fqn)
            module.lora_A["default"].weight.copy_(layer.A)
            module.lora_B["default"].weight.copy_(layer.B)
    return len(layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="inter", choices=["inter", "intra"])
    parser.add_argument("--train", type=int, default=100, help="train examples per task")
    parser.add_argument("--eval", type=int, default=10, help="eval examples per task")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the suite")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="training seed: batch schedule and adapter init")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank of both (alpha = 2 x rank)")
    parser.add_argument("--init", choices=["copy", "peft"], default="copy")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--timing-skip", type=int, default=3, help="first steps left out of the time ratio")
    parser.add_argument("--no-cache", action="store_true", help="greedy decoding without the KV cache")
    parser.add_argument("--base", action="store_true", help="also evaluate the base model")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--markdown", metavar="PATH")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    started = time.perf_counter()
    info = machine_info("peft")
    machine = machine_line(info)
    print(f"machine: {machine}", flush=True)

    train_examples, eval_examples = make_suite(opts.suite, opts.train, opts.eval, opts.data_seed)
    targs = TrainArgs(steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr, seed=opts.seed)
    say = lambda m: print(m, flush=True)  # noqa: E731

    ours_loaded = load_model(opts.model)
    peft_loaded = load_model(opts.model)
    tokenizer = ours_loaded.tokenizer
    config = MALoRAConfig(method="lora", targets=TARGETS, rank=opts.rank, alpha=2.0 * opts.rank, seed=opts.seed)
    gm = transform(ours_loaded.model, config)
    run = prepare(gm, train_examples, targs, tokenizer=tokenizer, progress=False, say=lambda m: None)
    ours_params = sum(p.numel() for p in run.optimizer.param_groups[0]["params"])

    peft_model = build_peft(peft_loaded.model, opts.rank, opts.seed)
    if opts.init == "copy":
        say(f"copied our initial adapters into PEFT's ({copy_init(gm, peft_model)} sites)")
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    peer = PeerRun(peft_model, params, peft_loaded.tokenizer, train_examples, targs)
    peft_params = sum(p.numel() for p in params)
    say(f"trainable parameters: ours {ours_params:,}, peft {peft_params:,}")
    if peer.total_steps != run.total_steps:
        raise SystemExit(f"step counts differ: {peer.total_steps} vs {run.total_steps}")

    rows = lockstep({"ours": run.step, "peft": peer.step}, run.total_steps, say)
    skip = min(opts.timing_skip, run.total_steps - 1)
    timing = step_ratio(rows, "peft", "ours", skip)
    loss_gap = [abs(a["loss"] - b["loss"]) for a, b in zip(rows["ours"], rows["peft"], strict=True)]
    tail = max(1, min(10, run.total_steps // 4))

    say("evaluating ...")
    tables: dict[str, dict] = {}
    eval_seconds: dict[str, float] = {}
    set_adapters_training(gm, False)
    peft_model.eval()
    t0 = time.perf_counter()
    decoder = None if opts.no_cache else cached_decoder(ours_loaded.model, gm)
    tables["ours"] = eval_table(logits_fn_of(gm), tokenizer, eval_examples, targs, opts.max_new_tokens, decoder)
    eval_seconds["ours"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    decoder = None if opts.no_cache else cached_decoder(peft_model.get_base_model())
    fn = logits_fn_of(peft_model)
    tables["peft"] = eval_table(fn, peft_loaded.tokenizer, eval_examples, targs, opts.max_new_tokens, decoder)
    eval_seconds["peft"] = time.perf_counter() - t0
    if opts.base:
        with peft_model.disable_adapter():
            tables = {"base": eval_table(fn, tokenizer, eval_examples, targs, opts.max_new_tokens, decoder), **tables}

    train_summary = {
        name: {
            "first_loss": r[0]["loss"],
            "final_loss": r[-1]["loss"],
            f"mean_loss_last_{tail}": statistics.fmean(x["loss"] for x in r[-tail:]),
            "tokens_per_s": sum(x["tokens"] for x in r[skip:]) / sum(x["seconds"] for x in r[skip:]),
            "median_step_s": statistics.median(x["seconds"] for x in r[skip:]),
        }
        for name, r in rows.items()
    }
    print()
    print(f"machine: {machine}")
    print(
        f"{opts.model}, suite {opts.suite} ({opts.train} train / {opts.eval} eval per task, data seed "
        f"{opts.data_seed}), {run.total_steps} steps of {opts.batch_size}, lr {opts.lr:g}, seed {opts.seed}, "
        f"LoRA r{opts.rank} alpha {2 * opts.rank} on {TARGETS}, init {opts.init}"
    )
    print(f"\n{'run':<6} {'params':>12} {'first loss':>11} {'final loss':>11} {'last-' + str(tail) + ' mean':>12}")
    for name, s in train_summary.items():
        n = ours_params if name == "ours" else peft_params
        print(
            f"{name:<6} {n:>12,} {s['first_loss']:>11.4f} {s['final_loss']:>11.4f} {s[f'mean_loss_last_{tail}']:>12.4f}"
        )
    print(f"max |loss(ours) - loss(peft)| over the steps: {max(loss_gap):.3g}")
    print(
        f"step time peft / ours (lock-step, {timing['steps_timed']} steps after {skip}): "
        f"{timing['median_of_step_ratios']:.3f}x median of per-step ratios, {timing['ratio_of_sums']:.3f}x of sums"
    )
    print()
    print_quality(tables)

    result = {
        "tool": "tools/peers/peft_lora.py",
        "command": command_line(),
        "machine": {**info, "line": machine},
        "settings": vars(opts),
        "train_args": train_args_dict(targs),
        "targets": TARGETS,
        "trainable_parameters": {"ours": ours_params, "peft": peft_params},
        "train": train_summary,
        "max_abs_loss_difference": max(loss_gap),
        "step_time_ratio_peft_over_ours": timing,
        "eval": tables,
        "eval_seconds": eval_seconds,
        "losses": {name: [x["loss"] for x in r] for name, r in rows.items()},
        "step_seconds": {name: [x["seconds"] for x in r] for name, r in rows.items()},
        "wall_s": time.perf_counter() - started,
    }
    md = [
        "# PEFT LoRA vs malora-fx `lora` (tools/peers/peft_lora.py)",
        "",
        f"machine: {machine}",
        "",
        "```bash",
        result["command"],
        "```",
        "",
        f"{opts.model}, suite `{opts.suite}` ({opts.train} train / {opts.eval} eval examples per task), "
        f"{run.total_steps} steps of batch {opts.batch_size}, lr {opts.lr:g} (AdamW, warm-up "
        f"{targs.warmup_ratio:g} then cosine, clip {targs.max_grad_norm:g}), seed {opts.seed}; LoRA r{opts.rank}, "
        f"alpha {2 * opts.rank}, dropout 0 on {TARGETS}; init `{opts.init}`; same batches in the same order; "
        f"exact match by greedy decoding ({'no cache' if opts.no_cache else 'KV cache'}).",
        "",
        "| run | trainable | first loss | final loss | mean loss, last " + str(tail) + " | median step s | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in train_summary.items():
        n = ours_params if name == "ours" else peft_params
        md.append(
            f"| {name} | {n:,} | {s['first_loss']:.4f} | {s['final_loss']:.4f} | {s[f'mean_loss_last_{tail}']:.4f} | "
            f"{s['median_step_s']:.2f} | {s['tokens_per_s']:.0f} |"
        )
    md += [
        "",
        f"Step time peft / ours, lock-step on the same batches ({timing['steps_timed']} steps after the first "
        f"{skip}): **{timing['median_of_step_ratios']:.3f}×** (median of per-step ratios; "
        f"{timing['ratio_of_sums']:.3f}× ratio of sums). Largest per-step training-loss difference: "
        f"{max(loss_gap):.3g}.",
        "",
        "Eval split (malora-fx `evaluate`: response loss, greedy exact match):",
        "",
        *quality_table(tables),
        "",
        f"Wall time {result['wall_s'] / 60:.1f} min.",
    ]
    write_outputs(result, md, opts.json, opts.markdown)


if __name__ == "__main__":
    main()
