"""``malora-fx quickstart``: the whole pipeline once on the default model."""

from __future__ import annotations

import argparse

from ..errors import MaloraError


def add_parsers(sub) -> None:
    """``quickstart``."""
    from ..graph.sources import DEFAULT_MODEL

    p = sub.add_parser(
        "quickstart",
        help="fetch, transform, train, merge, lower, export and run, on the default model",
        description="The whole pipeline once: a short multi-task training of the embedded default "
        "model, exported to ONNX and run in onnxruntime, with a summary table.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--method", default="malora")
    p.set_defaults(func=cmd_quickstart)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from ..quickstart import format_summary, run_quickstart

    if args.steps < 1:
        raise MaloraError(f"--steps: {args.steps} must be >= 1")
    summary = run_quickstart(args.model, args.out, steps=args.steps, method=args.method)
    print(format_summary(summary))
    return 0
