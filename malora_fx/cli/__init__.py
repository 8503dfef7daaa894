"""The ``malora-fx`` command line: one module per command group.

    transform.py   transform, fetch
    train.py       data make, train, eval, inspect
    deploy.py      export, run, import-peft, bench
    quickstart.py  quickstart

Flags that set a config field are built from the config dataclasses
(``flags.py``). Usage errors (bad values, missing files, targets that match
nothing) print one line ``malora-fx: error: ...`` to stderr and exit with
status 2, leaving no output behind.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..errors import MaloraError
from . import deploy, quickstart, train, transform
from .flags import EXIT_USAGE, OneLineParser

COMMAND_GROUPS = (transform, train, deploy, quickstart)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="malora-fx", description="MALoRA adapters through graph passes.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log one line per graph pass")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for group in COMMAND_GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except MaloraError as exc:
        print(f"malora-fx: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
