"""Training-step time of MALoRA vs MoLoRA vs LoRA on SmolLM2-135M (DESIGN §2, §7).

One step = forward on a fixed batch, LM cross-entropy on the shifted logits
(+ 0.01 x load-balancing loss for the routed methods), backward, AdamW step on
``malora_fx.trainable_parameters(gm)``, zero_grad. Variants:

    malora   r̄=12, d=32, 8 experts, top-2
    molora   8 experts x rank 8, top-2 (all experts batched)
    lora     rank 64
    base     reference: the captured model without adapters, forward + backward
             down to the input embeddings (no weight gradients, no optimiser)

Adapters sit on q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj (the paper's
targets). All variants come from one loaded model in one process and are timed
round-robin after warm-up, so drift hits them equally. Prints the median step
time per variant and the ratios MALoRA/MoLoRA (paper: <= 0.85) and MALoRA/LoRA
(paper: ~1.07). With ``--bf16``, every adapter variant is also timed under bf16
autocast (``malora-bf16``, ..., the same steps as ``malora-fx train --bf16``) in the
same rounds, and the bf16 / fp32 ratio per method is printed. Nothing is asserted.
Exact command (defaults: batch 4 x seq 128, 8 timed rounds after 3 warm-up rounds,
CPU):

    python tools/bench_train_step.py
    python tools/bench_train_step.py --bf16 --batch 8 --seq 64 --no-base
    python tools/bench_train_step.py --device cuda --json bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import malora_fx
from malora_fx import MALoRAConfig

TARGETS = "q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj"
CONFIGS = {
    "malora": MALoRAConfig(method="malora", targets=TARGETS, num_experts=8, top_k=2, rank=12, shared_rank=32),
    "molora": MALoRAConfig(method="molora", targets=TARGETS, num_experts=8, top_k=2, rank=8),
    "lora": MALoRAConfig(method="lora", targets=TARGETS, rank=64),
}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        if names:
            return names[0]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_step(gm, kwargs, labels, routed, params, device, bf16=False):
    """A closure running one training step of ``gm`` on the fixed inputs ``kwargs`` (``bf16``: under
    bf16 autocast, as the training loop does)."""
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = gm(**kwargs).logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels)
            if routed:
                loss = loss + malora_fx.aux_loss(gm, kwargs["attention_mask"]) * 0.01
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-base", action="store_true", help="skip the no-adapter reference row")
    parser.add_argument("--bf16", action="store_true", help="also time each adapter variant under bf16 autocast")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    device = torch.device(args.device)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    machine = {
        "platform": platform.platform(),
        "processor": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": f"{device.type} ({dev_name})",
    }
    if device.type == "cpu":  # whether oneDNN has bf16 kernels here (AVX512-BF16 / AMX); if not, autocast emulates
        try:
            machine["cpu bf16"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            machine["cpu bf16"] = "unknown"
    for key, value in machine.items():
        print(f"{key:>9}: {value}")

    model = malora_fx.load_model("smollm2-135m").model.to(device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = ids[:, 1:].reshape(-1)

    steps, counts = {}, {}
    torch.manual_seed(0)
    for name, config in CONFIGS.items():
        gm = malora_fx.transform(model, config, example_kwargs=batch)
        params = malora_fx.trainable_parameters(gm)
        with torch.no_grad():
            for layer in malora_fx.adapter_layers(gm).values():
                layer.B.normal_(0.0, 1e-3)  # B = 0 at init; make the update non-trivial
        counts[name] = sum(p.numel() for p in params)
        steps[name] = make_step(gm, batch, labels, config.routed, params, device)
        if args.bf16:  # the same module, so the same weights; its own optimiser state
            counts[f"{name}-bf16"] = counts[name]
            steps[f"{name}-bf16"] = make_step(gm, batch, labels, config.routed, params, device, bf16=True)
    if not args.no_base:
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids)
        base = malora_fx.capture(model, {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]})
        for param in base.parameters():
            param.requires_grad_(False)
        counts["base"] = 0
        steps["base"] = make_step(
            base,
            {"inputs_embeds": embeds.requires_grad_(), "attention_mask": batch["attention_mask"]},
            labels,
            False,
            [],
            device,
        )

    times = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    print(
        f"\nSmolLM2-135M, batch {args.batch} x seq {args.seq}, {args.steps} timed steps "
        f"(+{args.warmup} warm-up) per variant, round-robin; targets {TARGETS}"
    )
    print(f"{'variant':<12} {'trainable':>11} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'vs lora':>8}")
    for name, ts in times.items():
        print(
            f"{name:<12} {counts[name]:>11,} {medians[name] * 1e3:>10.1f} {min(ts) * 1e3:>9.1f} "
            f"{max(ts) * 1e3:>9.1f} {medians[name] / medians['lora']:>7.3f}x"
        )
    mins = {name: min(ts) for name, ts in times.items()}
    ratios = {f"malora/{other}": medians["malora"] / medians[other] for other in ("molora", "lora")}
    min_ratios = {f"malora/{other}": mins["malora"] / mins[other] for other in ("molora", "lora")}
    print(
        f"\nMALoRA / MoLoRA = {ratios['malora/molora']:.3f}x median, {min_ratios['malora/molora']:.3f}x min"
        "   (paper: <= 0.85x)"
    )
    print(
        f"MALoRA / LoRA   = {ratios['malora/lora']:.3f}x median, {min_ratios['malora/lora']:.3f}x min   (paper: ~1.07x)"
    )
    bf16_ratios = {name: medians[f"{name}-bf16"] / medians[name] for name in CONFIGS if f"{name}-bf16" in medians}
    for name, ratio in bf16_ratios.items():
        print(f"{name} bf16 autocast / fp32 = {ratio:.3f}x median")
    noisy = [name for name, ts in times.items() if statistics.median(ts) > 1.25 * min(ts)]
    if noisy:
        print(f"note: noisy timings ({', '.join(noisy)}: median > 1.25x min); rerun with more --warmup/--steps")

    if args.json:
        result = {
            "machine": machine,
            "settings": vars(args),
            "targets": TARGETS,
            "trainable_parameters": counts,
            "median_s": medians,
            "min_s": mins,
            "times_s": times,
            "ratios": ratios,
            "min_ratios": min_ratios,
            "bf16_over_fp32": bf16_ratios,
        }
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
