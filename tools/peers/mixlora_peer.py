"""MixLoRA (the PyPI ``mixlora`` package, 0.2.3) vs malora-fx MALoRA / MoLoRA / LoRA and PEFT LoRA.

``mixlora`` 0.2.3 is the inference half of MixLoRA: it injects adapters whose weights you hand
it, and has no trainer. So this tool sets them up itself (``build_mixlora``):

* ``MixLoraConfig`` with 8 experts, top-2, rank ``--rank`` (default 8, alpha 2 x rank: scale 2
  as malora-fx's default), ``act_fn="silu"`` (it must be given: SmolLM2's MLP is SiLU-gated),
  targets q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj. MixLoRA's design puts one plain LoRA
  on each targeted attention projection and a routed mixture of 8 LoRA experts over the MLP
  (gate/up/down; each chosen expert runs the whole MLP, base ``down_proj`` included, on its tokens);
* weights: ``lora_A`` Kaiming-uniform U(±1/sqrt(in)) (``nn.Linear``'s and malora-fx's init),
  ``lora_B`` zero, router N(0, 0.02) (its ``router_init_range``), from a generator seeded with
  ``--seed``;
* dropout must be > 0 (an assertion in ``LoraLinear``): it is set to 0.05 and every adapter's
  dropout module is put in eval mode, so no dropout is applied (the malora-fx runs use dropout 0);
* the experts and routers live in plain dicts and tensors, not registered submodules or
  parameters, so they are collected by hand (``lora_A``/``lora_B`` of every ``LoraLinear`` and each
  layer's ``gate_`` made a leaf that requires grad) and handed to the optimizer; only the
  attention LoRAs show up in ``model.parameters()``;
* no load-balancing loss: 0.2.3 computes none (its config's ``router_aux_loss_coef`` is read by
  the separate trainer, moe-peft). malora-fx's routed methods train with 0.01 x theirs.

Two measurements:

1. **Train-step time**, alternated, on one fixed batch (``--batch`` x ``--seq`` random tokens,
   4 x 128 by default) with ``--threads`` torch threads (1 by default, the reference
   measurement), exactly as ``tools/bench_train_step.py`` times a step (its ``make_step``: forward,
   mean cross-entropy, + 0.01 x aux loss for malora-fx's routed methods, backward, AdamW, zero_grad;
   B ~ N(0, 1e-3) so every gradient is non-trivial): malora-fx MALoRA (8 experts, top-2, r̄=12,
   d=32), MoLoRA (8 x r8, top-2) and LoRA r64, PEFT LoRA r64 (alpha 128) and MixLoRA, round-robin
   with the order rotating each round, after warm-up. Reported: median step time per variant and
   MALoRA's step time over each other's.
2. **Quality** (``--quality-steps``, 0 to skip): MixLoRA and MALoRA trained in lock-step on the
   ``inter`` suite with the same ``TrainArgs`` (MALoRA by ``malora_fx.training.loop.prepare`` +
   ``Run.step``, MixLoRA by ``tools/peers/_common.PeerRun``: malora-fx's batches, optimizer, schedule
   and ``train_step``, aux loss 0), then per-task loss and greedy exact match by malora-fx's
   ``evaluate`` (KV-cache decoding for both). Also the per-step time ratio on those real batches.

Not used: ``moe-peft`` (the MixLoRA authors' trainer) pins torch < 2.6 and transformers < 4.47,
against this project's torch 2.13 / transformers 5.x, so it is not installed. ``mixlora`` itself is
not a project dependency: ``pip install mixlora==0.2.3`` into the venv (it needs only torch,
transformers and huggingface-hub, all already there).

    python tools/peers/mixlora_peer.py --json tools/results/peers_mixlora.json \\
        --markdown tools/results/peers_mixlora.md          # timing + 60 quality steps, ~20 min on 2 cores
    python tools/peers/mixlora_peer.py --quality-steps 0                  # timing only, ~5 min
    python tools/peers/mixlora_peer.py --quality-steps 300 --train 200 --eval 20 --threads 2   # longer
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # tools/: bench_train_step's step and configurations

from _common import (  # noqa: E402
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
from bench_train_step import CONFIGS, make_step  # noqa: E402

import malora_fx  # noqa: E402
from malora_fx.graph.sources import load_model  # noqa: E402
from malora_fx.training.args import TrainArgs  # noqa: E402
from malora_fx.training.eval_decoder import cached_decoder  # noqa: E402
from malora_fx.training.loop import prepare  # noqa: E402

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# The reference measurement (batch 4 x 128, 1 thread): MALoRA's step time over each other's.
REFERENCE = {"malora/mixlora": 0.88, "malora/molora": 0.99, "malora/peft_lora": 1.11}


@dataclass
class MixLoRA:
    """A model with ``mixlora`` adapters injected, and handles on every adapter tensor."""

    model: Any
    config: Any
    loras: dict[str, Any] = field(default_factory=dict)  # weight-name prefix -> mixlora LoraLinear
    moes: dict[int, Any] = field(default_factory=dict)  # layer index -> MixLoraSparseMoe

    def parameters(self) -> list[torch.Tensor]:
        params = [gate.gate_ for gate in self.moes.values()]
        for lora in self.loras.values():
            params += [lora.lora_A.weight, lora.lora_B.weight]
        return params


def initial_weights(model, config, seed: int) -> dict[str, torch.Tensor]:
    """The ``mixlora`` weight dict for ``model``: A ~ U(±1/sqrt(in)), B = 0, router ~ N(0, 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    rank, experts = config.lora_r_, config.num_experts_
    weights: dict[str, torch.Tensor] = {}

    def lora(prefix: str, linear) -> None:
        bound = 1.0 / math.sqrt(linear.in_features)
        weights[f"{prefix}.lora_A.weight"] = (torch.rand(rank, linear.in_features, generator=gen) * 2 - 1) * bound
        weights[f"{prefix}.lora_B.weight"] = torch.zeros(linear.out_features, rank)

    for index, layer in enumerate(model.model.layers):
        for name in ATTENTION:
            if config.target_modules_.get(name):
                lora(f"mixlora.layers.{index}.self_attn.{name}", getattr(layer.self_attn, name))
        hidden = model.config.hidden_size
        gate = torch.randn(experts, hidden, generator=gen) * config.router_init_range_
        weights[f"mixlora.layers.{index}.mlp.moe_gate.weight"] = gate
        for name in MLP:
            if config.target_modules_.get(name):
                for e in range(experts):
                    lora(f"mixlora.layers.{index}.mlp.{name}.experts.{e}", getattr(layer.mlp, name))
    return weights


def build_mixlora(model, *, rank: int, experts: int, top_k: int, targets: list[str], seed: int) -> MixLoRA:
    """Inject MixLoRA into a transformers Llama-family ``model`` (in place); base frozen, no dropout."""
    from mixlora import MixLoraConfig, inject_adapter_in_model
    from mixlora.config import lora_target_modules

    unknown = sorted(set(targets) - set(ATTENTION) - set(MLP))
    if unknown:
        raise SystemExit(f"mixlora: targets {unknown} are not attention or MLP projections it supports")
    config = MixLoraConfig(
        base_model_="smollm2-135m",
        task_type_="CAUSAL_LM",
        peft_type_="MIXLORA",
        adapter_name_="default",
        dtype_=torch.float32,
        lora_r_=rank,
        lora_alpha_=2 * rank,
        lora_dropout_=0.05,  # must be > 0; the dropout modules are put in eval mode below
        target_modules_={name: name in targets for name in lora_target_modules},
        routing_strategy_="mixlora",
        router_aux_loss_coef_=0.001,  # unused by mixlora 0.2.3 (inference only)
        router_init_range_=0.02,
        jitter_noise_=0.0,
        num_experts_=experts,
        act_fn_="silu",
        top_k_=top_k,
    ).check()
    model.requires_grad_(False)
    inject_adapter_in_model(model, config, initial_weights(model, config, seed))
    handle = MixLoRA(model, config)
    for index, layer in enumerate(model.model.layers):
        for name in ATTENTION:
            module = getattr(layer.self_attn, name)
            if config.target_modules_.get(name):
                handle.loras[f"mixlora.layers.{index}.self_attn.{name}"] = module
        moe = layer.mlp.mixlora_moes["default"]
        moe.gate_ = moe.gate_.detach().clone().requires_grad_(True)
        handle.moes[index] = moe
        for key, lora in moe.experts_.items():  # "experts.{e}.{proj}"
            _, e, proj = key.split(".")
            handle.loras[f"mixlora.layers.{index}.mlp.{proj}.experts.{e}"] = lora
    model.eval()
    for lora in handle.loras.values():
        lora.dropout_.eval()
        lora.lora_A.weight.requires_grad_(True)
        lora.lora_B.weight.requires_grad_(True)
    return handle


def build_peft(model, rank: int, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=TARGETS.split(","),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def time_steps(opts, say) -> dict[str, Any]:
    """Phase 1: alternated train-step times on one fixed batch."""
    ours_base = load_model(opts.model).model
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ours_base.config.vocab_size, (opts.batch, opts.seq), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = ids[:, 1:].reshape(-1)
    device = torch.device("cpu")
    steps, counts = {}, {}
    torch.manual_seed(0)
    for name, config in CONFIGS.items():
        gm = malora_fx.transform(ours_base, config, example_kwargs=batch)
        params = malora_fx.trainable_parameters(gm)
        with torch.no_grad():
            for layer in malora_fx.adapter_layers(gm).values():
                layer.B.normal_(0.0, 1e-3)
        counts[name] = sum(p.numel() for p in params)
        steps[name] = make_step(gm, batch, labels, config.routed, params, device)
    peft_model = build_peft(load_model(opts.model).model, 64, 0)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 1e-3)
    counts["peft_lora"] = sum(p.numel() for p in params)
    steps["peft_lora"] = make_step(peft_model, batch, labels, False, params, device)
    mix = build_mixlora(
        load_model(opts.model).model,
        rank=opts.rank,
        experts=opts.experts,
        top_k=opts.top_k,
        targets=TARGETS.split(","),
        seed=0,
    )
    with torch.no_grad():
        for lora in mix.loras.values():
            lora.lora_B.weight.normal_(0.0, 1e-3)
    counts["mixlora"] = sum(p.numel() for p in mix.parameters())
    steps["mixlora"] = make_step(mix.model, batch, labels, False, mix.parameters(), device)
    say("trainable parameters: " + ", ".join(f"{n} {c:,}" for n, c in counts.items()))

    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(opts.warmup + opts.timed):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            steps[name]()
            if i >= opts.warmup:
                times[name].append(time.perf_counter() - start)
        say(f"round {i + 1}/{opts.warmup + opts.timed}" + (" (warm-up)" if i < opts.warmup else ""))
    medians = {n: statistics.median(t) for n, t in times.items()}
    mins = {n: min(t) for n, t in times.items()}
    ratios = {f"malora/{n}": medians["malora"] / medians[n] for n in names if n != "malora"}
    ratios["mixlora/molora"] = medians["mixlora"] / medians["molora"]
    del steps, mix, peft_model
    return {
        "trainable_parameters": counts,
        "median_s": medians,
        "min_s": mins,
        "times_s": times,
        "ratios": ratios,
        "min_ratios": {f"malora/{n}": mins["malora"] / mins[n] for n in names if n != "malora"},
    }


def quality(opts, say) -> dict[str, Any]:
    """Phase 2: MixLoRA and MALoRA trained in lock-step on one suite, then evaluated."""
    train_examples, eval_examples = make_suite(opts.suite, opts.train, opts.eval, opts.data_seed)
    targs = TrainArgs(steps=opts.quality_steps, batch_size=opts.batch_size, lr=opts.lr, seed=opts.seed)
    ours = load_model(opts.model)
    config = dataclasses.replace(CONFIGS["malora"], seed=opts.seed)
    gm = malora_fx.transform(ours.model, config)
    run = prepare(gm, train_examples, targs, tokenizer=ours.tokenizer, progress=False, say=lambda m: None)
    peer_loaded = load_model(opts.model)
    mix = build_mixlora(
        peer_loaded.model,
        rank=opts.rank,
        experts=opts.experts,
        top_k=opts.top_k,
        targets=TARGETS.split(","),
        seed=opts.seed,
    )
    peer = PeerRun(mix.model, mix.parameters(), peer_loaded.tokenizer, train_examples, targs)
    rows = lockstep({"malora": run.step, "mixlora": peer.step}, run.total_steps, say)
    skip = min(opts.timing_skip, run.total_steps - 1)
    say("evaluating ...")
    malora_fx.set_adapters_training(gm, False)
    tables = {
        "malora": eval_table(
            logits_fn_of(gm), ours.tokenizer, eval_examples, targs, None, cached_decoder(ours.model, gm)
        ),
        "mixlora": eval_table(
            logits_fn_of(mix.model), peer_loaded.tokenizer, eval_examples, targs, None, cached_decoder(mix.model)
        ),
    }
    tail = max(1, min(10, run.total_steps // 4))
    return {
        "train_args": train_args_dict(targs),
        "train": {
            name: {
                "first_loss": r[0]["loss"],
                "final_loss": r[-1]["loss"],
                "mean_loss_last": statistics.fmean(x["loss"] for x in r[-tail:]),
                "last": tail,
                "median_step_s": statistics.median(x["seconds"] for x in r[skip:]),
                "tokens_per_s": sum(x["tokens"] for x in r[skip:]) / sum(x["seconds"] for x in r[skip:]),
            }
            for name, r in rows.items()
        },
        "step_time_ratio_malora_over_mixlora": step_ratio(rows, "malora", "mixlora", skip),
        "eval": tables,
        "losses": {name: [x["loss"] for x in r] for name, r in rows.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8, help="MixLoRA rank (attention LoRAs and experts)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="timing batch (rows)")
    parser.add_argument("--seq", type=int, default=128, help="timing batch (tokens per row)")
    parser.add_argument("--timed", type=int, default=8, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--quality-steps", type=int, default=60, help="0: skip the quality run")
    parser.add_argument("--suite", default="inter", choices=["inter", "intra"])
    parser.add_argument("--train", type=int, default=100, help="train examples per task")
    parser.add_argument("--eval", type=int, default=10, help="eval examples per task")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="quality run batch size")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="quality run: schedule and adapter init")
    parser.add_argument("--timing-skip", type=int, default=3, help="quality run: first steps not timed")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--markdown", metavar="PATH")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    started = time.perf_counter()
    info = machine_info("peft", "mixlora")
    machine = machine_line(info)
    say = lambda m: print(m, flush=True)  # noqa: E731
    say(f"machine: {machine}")

    timing = time_steps(opts, say)
    result: dict[str, Any] = {
        "tool": "tools/peers/mixlora_peer.py",
        "command": command_line(),
        "machine": {**info, "line": machine},
        "settings": vars(opts),
        "targets": TARGETS,
        "timing": timing,
        "reference_ratios": REFERENCE,
    }
    if opts.quality_steps:
        result["quality"] = quality(opts, say)
    result["wall_s"] = time.perf_counter() - started

    counts, med = timing["trainable_parameters"], timing["median_s"]
    print(f"\nmachine: {machine}")
    print(
        f"{opts.model}, fixed batch {opts.batch} x {opts.seq}, {opts.timed} timed rounds (+{opts.warmup}), "
        f"round-robin; targets {TARGETS}"
    )
    print(f"{'variant':<10} {'trainable':>12} {'median ms':>10} {'min ms':>9} {'MALoRA / it':>12}")
    for name in med:
        print(
            f"{name:<10} {counts[name]:>12,} {med[name] * 1e3:>10.1f} {timing['min_s'][name] * 1e3:>9.1f} "
            f"{med['malora'] / med[name]:>11.3f}x"
        )
    for key, ref in REFERENCE.items():
        print(f"{key:<18} {timing['ratios'][key]:.3f}x   (reference measurement: {ref:.2f}x)")
    if "quality" in result:
        q = result["quality"]
        r = q["step_time_ratio_malora_over_mixlora"]
        print(
            f"\nquality: suite {opts.suite}, {opts.quality_steps} steps of {opts.batch_size}, lr {opts.lr:g}, "
            f"seed {opts.seed}; step time MALoRA / MixLoRA on those batches {r['median_of_step_ratios']:.3f}x"
        )
        for name, s in q["train"].items():
            print(f"{name:<8} first loss {s['first_loss']:.4f}  last-{s['last']} mean {s['mean_loss_last']:.4f}")
        print_quality(q["eval"])

    md = [
        "# MixLoRA (`mixlora` 0.2.3) vs malora-fx (tools/peers/mixlora_peer.py)",
        "",
        f"machine: {machine}",
        "",
        "```bash",
        result["command"],
        "```",
        "",
        f"Train-step time on {opts.model}, one fixed batch of {opts.batch} × {opts.seq} tokens, "
        f"{opts.timed} timed rounds after {opts.warmup} warm-up, round-robin with the order rotating; adapters on "
        f"{TARGETS}. MixLoRA: {opts.experts} experts, top-{opts.top_k}, rank {opts.rank} (plain LoRA r{opts.rank} "
        "on q/k/v, routed experts over the MLP), no load-balancing loss.",
        "",
        "| variant | trainable | median ms | min ms | MALoRA's step / this one's | reference |",
        "|---|---|---|---|---|---|",
    ]
    labels = {
        "malora": "malora-fx MALoRA (8×, top-2, r̄=12, d=32)",
        "molora": "malora-fx MoLoRA (8×r8, top-2)",
        "lora": "malora-fx LoRA r64",
        "peft_lora": "PEFT LoRA r64",
        "mixlora": f"MixLoRA ({opts.experts}×r{opts.rank}, top-{opts.top_k})",
    }
    for name in med:
        ref = REFERENCE.get(f"malora/{name}")
        md.append(
            f"| {labels.get(name, name)} | {counts[name]:,} | {med[name] * 1e3:.1f} | "
            f"{timing['min_s'][name] * 1e3:.1f} | {med['malora'] / med[name]:.3f}× | "
            f"{f'{ref:.2f}×' if ref else ''} |"
        )
    if "quality" in result:
        q = result["quality"]
        r = q["step_time_ratio_malora_over_mixlora"]
        md += [
            "",
            f"Quality: suite `{opts.suite}` ({opts.train} train / {opts.eval} eval per task), "
            f"{opts.quality_steps} steps of batch {opts.batch_size}, lr {opts.lr:g}, seed {opts.seed}, same "
            "batches in the same order (malora-fx's schedule, optimizer and step; MixLoRA without aux loss). "
            f"Step time MALoRA / MixLoRA on those batches: {r['median_of_step_ratios']:.3f}× (median of "
            f"per-step ratios, {r['steps_timed']} steps).",
            "",
            "| run | first loss | mean loss, last steps | median step s | tokens/s |",
            "|---|---|---|---|---|",
        ]
        for name, s in q["train"].items():
            md.append(
                f"| {name} | {s['first_loss']:.4f} | {s['mean_loss_last']:.4f} (last {s['last']}) | "
                f"{s['median_step_s']:.2f} | {s['tokens_per_s']:.0f} |"
            )
        md += ["", *quality_table(q["eval"])]
    md += ["", f"Wall time {result['wall_s'] / 60:.1f} min."]
    write_outputs(result, md, opts.json, opts.markdown)


if __name__ == "__main__":
    main()
