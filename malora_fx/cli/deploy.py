"""``malora-fx export``, ``run``, ``import-peft`` and ``bench``.

Thin argument parsing over :mod:`malora_fx.deploy`: what an export holds is
read from its ``export.json`` through :class:`~malora_fx.deploy.manifest.ExportManifest`
only. ``bench`` re-exports comparison variants (once, under EXPORT_DIR/bench/)
from the run directory the manifest records in ``adapters``. Bad input raises
:class:`~malora_fx.errors.MaloraError` (one line, exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MaloraError

if TYPE_CHECKING:
    from ..deploy.manifest import ExportManifest


def add_parsers(sub) -> None:
    """``export``, ``run``, ``import-peft`` and ``bench``."""
    p = sub.add_parser(
        "export",
        help="export a run (adapters merged and lowered) to ONNX",
        description="Write EXPORT_DIR/model.onnx (+ tokenizer, export.json). Decoders get a KV cache.",
    )
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="export directory")
    p.add_argument("--dtype", default="fp32", help="fp32 or fp16")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18)")
    p.add_argument("--no-cache", action="store_true", help="export without KV cache inputs/outputs")
    p.add_argument("--base-only", action="store_true", help="export the untouched base model (for comparisons)")
    p.add_argument(
        "--switchable",
        action="store_true",
        help="keep adapter tensors as overridable inputs, so .onnx_adapter files can be swapped per run",
    )
    p.add_argument(
        "--adapter-only",
        action="store_true",
        help="write only the adapters, as an onnxruntime .onnx_adapter file (--out FILE)",
    )
    p.add_argument(
        "--no-fuse",
        action="store_true",
        help="keep each adapter's router and down-projection GEMMs apart from the base GEMMs "
        "(fused by default: faster on onnxruntime CPU, see tools/bench_fusion.py)",
    )
    p.set_defaults(func=cmd_export)

    from ..deploy.runner import PROVIDERS

    p = sub.add_parser(
        "run",
        help="generate text with an exported model in onnxruntime",
        description="Stream generated text from EXPORT_DIR/model.onnx using its KV cache.",
    )
    p.add_argument("export_dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--adapter", help="an .onnx_adapter file to activate for this run")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--provider", default="auto", help=f"one of {', '.join(PROVIDERS)}")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template to the prompt")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "import-peft",
        help="turn a PEFT LoRA adapter directory into a malora-fx run directory",
        description="Convert PEFT's adapter_config.json + adapter_model.safetensors (LoRA) into a "
        "`lora` run directory that export / eval / run accept.",
    )
    p.add_argument("peft_dir")
    p.add_argument("--base", required=True, help="the base model source the adapter was trained on")
    p.add_argument("--out", required=True, help="run directory to write")
    p.set_defaults(func=cmd_import_peft)

    p = sub.add_parser(
        "bench",
        help="onnxruntime prefill / decode latency: base vs lowered vs unlowered vs PyTorch",
        description="Time EXPORT_DIR against the base export, the unlowered export and PyTorch eager "
        "(exports made once under EXPORT_DIR/bench/), alternated.",
    )
    p.add_argument("export_dir")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--provider", default="auto")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch eager")
    p.add_argument("--json", help="also write the timings here")
    p.set_defaults(func=cmd_bench)


def cmd_export(args: argparse.Namespace) -> int:
    from ..deploy.adapter_file import export_adapter
    from ..deploy.manifest import ExportManifest
    from ..deploy.onnx_export import export_run

    if args.adapter_only:
        if not args.out.endswith(".onnx_adapter"):
            raise MaloraError(f"--adapter-only: --out {args.out!r} must end with .onnx_adapter")
        print(f"wrote {export_adapter(args.run_dir, args.out, dtype=args.dtype)}")
        return 0
    out = export_run(
        args.run_dir,
        args.out,
        dtype=args.dtype,
        opset=args.opset,
        cache=not args.no_cache,
        base_only=args.base_only,
        switchable=args.switchable,
        fuse=not args.no_fuse,
    )
    manifest = ExportManifest.read(out)
    print(
        f"wrote {out}/model.onnx ({manifest.kind}, {manifest.dtype}, opset {manifest.opset}, "
        f"{'with' if manifest.kv_cache else 'without'} KV cache); inputs: {', '.join(manifest.inputs[:5])}"
        + (" ..." if len(manifest.inputs) > 5 else "")
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ..deploy.runner import OrtGenerator
    from ..training.evaluate import stop_token_ids

    gen = OrtGenerator(args.export_dir, args.provider)
    print(f"malora-fx: onnxruntime {gen.provider}", file=sys.stderr)
    tok = gen.tokenizer
    if getattr(tok, "chat_template", None) and not args.raw:
        text = tok.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = args.prompt
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    produced: list[int] = []
    shown = ""
    for token in gen.generate(
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        stop_ids=stop_token_ids(tok),
        adapter=args.adapter,
        seed=args.seed,
    ):
        produced.append(token)
        text_now = str(tok.decode(produced, skip_special_tokens=True))
        print(text_now[len(shown) :], end="", flush=True)
        shown = text_now
    print()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import platform

    from ..deploy.bench import benchmark, format_table, ort_runner
    from ..deploy.runner import OrtGenerator, read_export

    manifest = read_export(args.export_dir)
    run_dir = manifest.adapters
    if not manifest.kv_cache or not run_dir:
        raise MaloraError(f"{args.export_dir}: bench needs an adapted decoder export with a KV cache")
    lowered = OrtGenerator(args.export_dir, args.provider)
    bench_dir = Path(args.export_dir) / "bench"
    base = OrtGenerator(_cached_export(run_dir, manifest, bench_dir / "base", base_only=True), args.provider)
    variants = {"base export": ort_runner(base), "lowered export": ort_runner(lowered)}
    try:
        variants["unlowered export"] = ort_runner(
            OrtGenerator(_cached_export(run_dir, manifest, bench_dir / "unlowered", lowered=False), args.provider)
        )
    except Exception as exc:  # report, do not fail: the point is whether it exports at all
        print(f"unlowered export: does not export ({str(exc).splitlines()[0][:120]})", file=sys.stderr)
    if not args.no_torch:
        variants["pytorch eager"] = _torch_variant(run_dir, manifest)
    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, onnxruntime {lowered.provider}"
    )
    timings = benchmark(
        variants,
        batch=args.batch,
        seq=args.seq,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        vocab=min(manifest.vocab_size or 1000, 1000),
    )
    print(format_table(timings, args.batch, args.seq))
    if args.json:
        Path(args.json).write_text(
            json.dumps({n: {"prefill_s": t.prefill_s, "decode_s": t.decode_s} for n, t in timings.items()}, indent=2)
        )
    return 0


def _cached_export(run_dir: str, manifest: ExportManifest, out: Path, **options) -> Path:
    """``out``, exported from ``run_dir`` (the run the manifest names) unless already there."""
    from ..deploy.manifest import EXPORT_JSON
    from ..deploy.onnx_export import export_run

    if not (out / EXPORT_JSON).is_file():
        print(f"malora-fx: exporting {out.name} variant for comparison", file=sys.stderr)
        export_run(run_dir, out, dtype=manifest.dtype, opset=manifest.opset, **options)
    return out


def _torch_variant(run_dir: str, manifest: ExportManifest):
    """PyTorch eager over ``run_dir`` (the run the manifest names), captured with the export's cache geometry."""
    from ..adapters.run_dir import apply_run_adapters, read_run
    from ..deploy.bench import torch_runner
    from ..deploy.manifest import torch_dtype
    from ..graph.cached_decoder import capture_decoder

    dtype = torch_dtype(manifest.dtype)
    info, loaded = read_run(run_dir)
    gm, _ = capture_decoder(loaded.model.to(dtype), dtype)
    gm = apply_run_adapters(gm, run_dir, info)
    return torch_runner(gm, *manifest.cache_geometry(), dtype=dtype)


def cmd_import_peft(args: argparse.Namespace) -> int:
    from ..deploy.peft_import import convert_peft

    out = convert_peft(args.peft_dir, args.out, args.base)
    sites = json.loads((out / "adapter_config.json").read_text())["sites"]
    print(f"wrote {out} (method lora, {len(sites)} sites)")
    return 0
