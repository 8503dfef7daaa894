"""``malora-fx quickstart``: the whole pipeline once on the default model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import MaloraError


def add_parsers(sub) -> None:
    """``quickstart``."""
    from ..graph.sources import DEFAULT_MODEL
    from ..quickstart import QUICK_STEPS

    p = sub.add_parser(
        "quickstart",
        help="fetch, transform, train, merge, lower, export and run, on the default model",
        description="The whole pipeline once: a short multi-task training of the embedded default "
        "model, exported to ONNX and run in onnxruntime, with a summary table.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument(
        "--out",
        default="runs/quickstart",
        help="output directory; a non-empty one is refused unless it holds an earlier quickstart or --overwrite",
    )
    p.add_argument("--steps", type=int, default=QUICK_STEPS)
    p.add_argument("--method", default="malora")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out anyway")
    p.set_defaults(func=cmd_quickstart)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from ..quickstart import format_summary, run_quickstart

    if args.steps < 1:
        raise MaloraError(f"--steps: {args.steps} must be >= 1")
    _check_out(Path(args.out), args.overwrite)
    summary = run_quickstart(args.model, args.out, steps=args.steps, method=args.method)
    print(format_summary(summary))
    return 0


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse to write into a file, or into a non-empty folder that no earlier quickstart made."""
    if out.exists() and not out.is_dir():
        raise MaloraError(f"--out {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "quickstart.json").is_file() and not overwrite:
        raise MaloraError(
            f"--out {str(out)!r} is not empty and holds no earlier quickstart; "
            "choose a new directory or pass --overwrite"
        )
