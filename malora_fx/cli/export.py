"""``malora-fx export`` (a run to ONNX, or its adapters to an .onnx_adapter file) and ``malora-fx import-peft``.

Thin argument parsing over :mod:`malora_fx.deploy`. Bad input raises
:class:`~malora_fx.errors.MaloraError` (one line, exit status 2); ``--out`` is
written complete or not at all, and a non-empty one is refused unless
``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MaloraError

if TYPE_CHECKING:
    pass


def add_parsers(sub) -> None:
    """``export`` and ``import-peft``."""
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
    p.add_argument(
        "--no-ort-fusions",
        action="store_true",
        help="keep standard ONNX ops: no onnxruntime kernels for attention (GroupQueryAttention, "
        "MultiHeadAttention), rotary, RMSNorm / LayerNorm and their residual adds "
        "(SkipSimplifiedLayerNormalization), for runtimes other than onnxruntime",
    )
    p.add_argument(
        "--moe-kernel",
        action="store_true",
        help="run each routed adapter as one onnxruntime MoE node that computes only the top-k experts "
        "(off by default: measured slower than the dense lowering on CPU, see README)",
    )
    p.add_argument(
        "--torch-onnx-export",
        action="store_true",
        help="translate with torch.onnx.export, which traces the graph twice more (slower; the same graph): "
        "by default the captured graph is translated directly, and torch.onnx.export is used only where "
        "that declines (a stage named torch.onnx instead of translate)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument(
        "--verify",
        action="store_true",
        help="then compare the export with the run's PyTorch model on the CPU (as malora-fx verify does); "
        "exit status 1 when they differ beyond the tolerance (the export is kept)",
    )
    p.set_defaults(func=cmd_export)

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


def cmd_export(args: argparse.Namespace) -> int:
    from ..deploy.adapter_file import export_adapter
    from ..deploy.manifest import ExportManifest
    from ..deploy.onnx_export import export_run
    from ..deploy.stage_clock import StageClock

    _check_export_options(args)
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
        ort_fusions=not args.no_ort_fusions,
        moe_kernel=args.moe_kernel,
        direct=not args.torch_onnx_export,
        clock=(clock := StageClock(say=_say, prefix="export: ")),
    )
    _say(f"export: {clock.summary()}")
    manifest = ExportManifest.read(out)
    print(
        f"wrote {out}/model.onnx ({manifest.kind}, {manifest.dtype}, opset {manifest.opset}, "
        f"{'with' if manifest.kv_cache else 'without'} KV cache"
        f"{'; an onnxruntime-genai model folder' if manifest.kv_cache else ''}); "
        f"inputs: {', '.join(manifest.inputs[:5])}" + (" ..." if len(manifest.inputs) > 5 else "")
    )
    if args.verify:
        from ..deploy.verify import verify_export

        result = verify_export(out, args.run_dir, provider="cpu")
        print(result.table())
        if not result.passed:
            _say(f"export: {out} differs from the run's PyTorch model beyond the tolerance (kept; see above)")
            return 1
    return 0


def _say(message: str) -> None:
    print(f"malora-fx: {message}", file=sys.stderr, flush=True)


def _check_export_options(args: argparse.Namespace) -> None:
    """Refuse option combinations that would silently do something else, and a non-empty --out."""
    if args.base_only and (args.switchable or args.adapter_only):
        other = "--switchable" if args.switchable else "--adapter-only"
        raise MaloraError(f"--base-only: cannot be combined with {other}; the base export has no adapters")
    if args.adapter_only and (args.switchable or args.no_cache or args.no_fuse or args.no_ort_fusions or args.verify):
        raise MaloraError(
            "--adapter-only: writes only an .onnx_adapter file; allowed with --dtype only "
            "(not --switchable, --no-cache, --no-fuse, --no-ort-fusions, --verify)"
        )
    if args.moe_kernel and (args.no_ort_fusions or args.switchable or args.base_only or args.adapter_only):
        raise MaloraError(
            "--moe-kernel: writes onnxruntime MoE nodes for adapters merged into the graph; not with "
            "--no-ort-fusions, --switchable, --base-only or --adapter-only"
        )
    out = Path(args.out)
    if out.is_file() and not args.adapter_only:
        raise MaloraError(f"--out: {out} is a file; expected a new or empty directory")
    if out.exists() and not args.overwrite and (out.is_file() or any(out.iterdir())):
        raise MaloraError(f"--out {str(out)!r} exists and is not empty; choose a new path or pass --overwrite")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise MaloraError(f"--out: {out} is under {parent}, which is a file; expected a directory path")


def cmd_import_peft(args: argparse.Namespace) -> int:
    from ..deploy.peft_import import convert_peft

    out = convert_peft(args.peft_dir, args.out, args.base)
    sites = json.loads((out / "adapter_config.json").read_text())["sites"]
    print(f"wrote {out} (method lora, {len(sites)} sites)")
    return 0
