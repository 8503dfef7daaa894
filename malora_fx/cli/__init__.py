"""The ``malora-fx`` command line: one module per command group.

    transform.py   transform, fetch
    train.py       data make, train, eval, inspect
    export.py      export, import-peft
    serve.py       run, bench
    quickstart.py  quickstart

Flags that set a config field are built from the config dataclasses
(``flags.py``). Usage errors (bad values, missing files, targets that match
nothing) print one line ``malora-fx: error: ...`` to stderr and exit with
status 2, leaving no output behind.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings
from collections.abc import Sequence

from ..errors import MaloraError
from . import export, quickstart, serve, sweep, train, transform
from .flags import EXIT_USAGE, OneLineParser

COMMAND_GROUPS = (transform, train, export, serve, quickstart, sweep)
# Loggers of the libraries the commands drive; without -v only their errors are shown.
THIRD_PARTY_LOGGERS = (
    "transformers",
    "torch",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "gguf",
    "huggingface_hub",
    "py.warnings",
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="malora-fx", description="MALoRA adapters through graph passes.")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log one line per graph pass and show third-party warnings"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for group in COMMAND_GROUPS:
        group.add_parsers(sub)
    return parser


def quiet_third_party(verbose: bool) -> None:
    """Route third-party warnings and logging to the level the user picked.

    Without ``-v`` the command line shows its own progress and errors only: Python warnings
    (``FutureWarning``s, ``torchvision is not installed``, ...) are captured into the logging
    module and dropped below ERROR, the libraries' loggers are set to ERROR, and transformers'
    progress bars (GGUF de-quantisation) are disabled. With ``-v`` all of it is shown.
    """
    logging.captureWarnings(True)
    level = logging.WARNING if verbose else logging.ERROR
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if verbose:
        warnings.simplefilter("default")
        return
    warnings.simplefilter("ignore")
    try:  # transformers keeps its own verbosity and progress-bar switches
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def _command_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> dict[str, str]:
    """``{dest: flag}`` of the options of the (sub)command ``argv`` runs."""
    options: dict[str, str] = {}
    current: argparse.ArgumentParser | None = parser
    words = [w for w in argv if not w.startswith("-")]
    while current is not None:
        nested = None
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                for word in words:
                    if word in action.choices:
                        nested = action.choices[word]
                        break
            elif action.option_strings and action.dest not in ("help", "verbose"):
                options[action.dest] = max(action.option_strings, key=len)
        current = nested
    return options


def cli_message(message: str, options: dict[str, str]) -> str:
    """A library message in the command line's language: Python parameter names become flags.

    ``dtype: 'fp8'; allowed: ...`` → ``--dtype: ...`` (also ``steps and epochs: ...``),
    ``num_experts=8`` → ``--experts=8``, ``resume=True`` → ``--resume``, and a parameter
    name with an underscore anywhere (``shared_rank is only used ...``) → its flag.
    Only the options of the command being run are translated.
    """
    if not options:
        return message
    names = "|".join(sorted(map(re.escape, options), key=len, reverse=True))
    head = re.match(rf"^((?:{names})(?:(?:, | and | or )(?:{names}))*)(?=[:= ])", message)
    if head:
        translated = re.sub(rf"\b({names})\b", lambda m: options[m.group(1)], head.group(1))
        message = translated + message[head.end() :]
    message = re.sub(rf"(?<![\w.\-'])({names})=True\b", lambda m: options[m.group(1)], message)
    message = re.sub(rf"(?<![\w.\-'])({names})=", lambda m: options[m.group(1)] + "=", message)
    underscored = [name for name in options if "_" in name]
    if underscored:
        pattern = "|".join(sorted(map(re.escape, underscored), key=len, reverse=True))
        message = re.sub(rf"(?<![\w.\-'/])({pattern})\b(?![='/])", lambda m: options[m.group(1)], message)
    return message


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    quiet_third_party(args.verbose)
    try:
        return args.func(args)
    except MaloraError as exc:
        message = cli_message(str(exc), _command_options(parser, argv))
        print(f"malora-fx: error: {message}", file=sys.stderr)
        return EXIT_USAGE
