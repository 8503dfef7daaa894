"""Does fusing projections (passes/fuse_projections.py) make the ONNX export faster?

Exports one decoder four ways and times them in onnxruntime, alternated
(A, B, C, D, A, …), with the prefill of a batch × seq prompt and per-token
decode with the KV cache (malora_fx.deploy.bench):

    base             the base model, as `malora-fx export --base-only`
    base all-fused   the base with q/k/v and gate/up each fused into one GEMM
    malora lowered   MALoRA merged and lowered, no fusion (`--no-fuse`)
    malora fused     the same with lower(fuse=True): each adapter's router and
                     shared down-projection fused with the base GEMMs reading
                     the same input (the `malora-fx export` default)

The ratios printed last decide what fusion does by default.

    python tools/bench_fusion.py                       # SmolLM2-135M, all 30 layers (~10 min)
    python tools/bench_fusion.py --layers 6 --repeats 3   # quicker look, same widths

The adapters get random values (B included), so every routed path computes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

import malora_fx as mf
from malora_fx.deploy.bench import benchmark, format_table, ort_runner
from malora_fx.deploy.onnx_export import export_decoder_graph
from malora_fx.deploy.runner import OrtGenerator
from malora_fx.fileio import atomic_write
from malora_fx.graph.cached_decoder import capture_decoder
from malora_fx.passes import run_passes
from malora_fx.passes.fuse_projections import FuseProjections


def truncated(model, layers: int | None):
    """``model`` with only its first ``layers`` decoder layers (None: all)."""
    if layers is None or layers >= model.config.num_hidden_layers:
        return model
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    return model


def adapted_graph(model, config: mf.MALoRAConfig, seed: int):
    gm, example = capture_decoder(model)
    gm = mf.transform(gm, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in mf.trainable_parameters(gm):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    mf.set_adapters_training(gm, False)
    return gm, example


OPTIONS_FILE = "bench_fusion.json"  # export.json has a fixed schema; this tool's reuse key lives beside it
VARIANTS = [  # (name, adapted, how to fuse)
    ("base", False, None),
    ("base all-fused", False, "all"),
    ("malora lowered", True, None),
    ("malora fused", True, "default"),
]


def export_variants(args, work: Path, tokenizer, model) -> dict[str, Path]:
    config = mf.MALoRAConfig(method=args.method, targets=args.targets)
    out = {}
    for name, adapted, fuse in VARIANTS:
        out[name] = work / name.replace(" ", "-")
        if _made_with(out[name]) == _options(args):
            print(f"reusing {out[name]}", flush=True)
            continue
        shutil.rmtree(out[name], ignore_errors=True)
        start = time.perf_counter()
        gm, example = adapted_graph(model, config, args.seed) if adapted else capture_decoder(model)
        gm = mf.lower(mf.merge(gm, inplace=True), inplace=True, fuse=fuse == "default")
        if fuse == "all":  # q/k/v and gate/up of the base too, which lower(fuse=True) leaves alone
            run_passes(gm, [FuseProjections()])
        export_decoder_graph(gm, example, model.config, out[name], tokenizer=tokenizer)
        options = json.dumps(_options(args), indent=2) + "\n"
        atomic_write(out[name] / OPTIONS_FILE, lambda tmp, text=options: tmp.write_text(text))
        print(f"exported {name} in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def _options(args) -> dict:
    """What an export in --workdir depends on: reused only when these match."""
    return {
        "model": args.model,
        "layers": args.layers,
        "targets": args.targets,
        "method": args.method,
        "seed": args.seed,
    }


def _made_with(export_dir: Path) -> dict | None:
    """The options an export in --workdir was made with (written next to its export.json), if any."""
    made = export_dir / OPTIONS_FILE
    return json.loads(made.read_text()) if made.is_file() and (export_dir / "export.json").is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj")
    parser.add_argument("--method", default="malora")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workdir",
        default=None,
        help="keep the exports here and reuse those already there (default: a temporary directory)",
    )
    args = parser.parse_args()

    loaded = mf.load_model(args.model)
    model = truncated(loaded.model.to(torch.float32).eval(), args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        exports = export_variants(args, work, loaded.tokenizer, model)
        gens = {name: OrtGenerator(path, "cpu") for name, path in exports.items()}
        timings = benchmark(
            {name: ort_runner(g) for name, g in gens.items()},
            batch=args.batch,
            seq=args.seq,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            vocab=min(int(model.config.vocab_size), 1000),
        )
    print(
        f"\nmachine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"{args.model}, {model.config.num_hidden_layers} layers, {args.method} on {args.targets}; "
        f"{args.repeats} alternated repeats"
    )
    print(format_table(timings, args.batch, args.seq))
    t = timings
    for label, a, b in [
        ("fused / unfused (malora)", "malora fused", "malora lowered"),
        ("all-fused / unfused (base)", "base all-fused", "base"),
        ("malora lowered / base", "malora lowered", "base"),
        ("malora fused / base", "malora fused", "base"),
    ]:
        print(f"{label:<30} prefill {t[a].prefill / t[b].prefill:.3f}x   decode {t[a].decode / t[b].decode:.3f}x")


if __name__ == "__main__":
    main()
