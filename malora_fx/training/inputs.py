"""What :func:`malora_fx.train` accepts, resolved and checked before anything loads.

* ``resolve_target``: a run directory (trained in place, its base model's
  tokenizer) or an adapted GraphModule (``tokenizer`` required, files only
  under ``out_dir``); the errors name the parameter at fault.
* ``read_examples``: a JSONL path or a non-empty list of ``Example``.
* ``check_checkpoints``: a run directory with checkpoints needs ``resume``;
  ``resume`` needs a complete checkpoint.
* ``run_fingerprint``: a digest of the data and the settings a resumed run
  must share with the run it continues (device, checkpoint cadence and
  ``resume`` itself may differ).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from torch import fx

from ..adapters.files import read_adapter_config
from ..adapters.transform import get_config
from ..errors import MaloraError
from .args import TrainArgs
from .checkpoint import complete_checkpoints, latest_checkpoint
from .data import Example, read_jsonl

Data = str | os.PathLike | Sequence[Example]


def resolve_target(
    target, args: TrainArgs, tokenizer, out_dir
) -> tuple[fx.GraphModule | None, dict | None, Path | None]:
    """``(GraphModule, None, out_dir or None)`` or ``(None, adapter_config, run_dir)``."""
    if isinstance(target, fx.GraphModule):
        if tokenizer is None:
            raise MaloraError("tokenizer: required to train a GraphModule (a run directory uses its base model's)")
        try:
            get_config(target)
        except ValueError:
            raise MaloraError(
                "target: this GraphModule has no malora-fx adapters; make it with malora_fx.transform"
            ) from None
        if out_dir is None and (args.save_every or args.resume):
            what = "resume=True" if args.resume else f"save_every={args.save_every}"
            raise MaloraError(f"out_dir: {what} needs out_dir, the directory that holds the checkpoints")
        return target, None, None if out_dir is None else Path(out_dir)
    if not isinstance(target, (str, os.PathLike)):
        raise MaloraError(f"target: expected a run directory or an adapted GraphModule, got {type(target).__name__}")
    if out_dir is not None:
        raise MaloraError("out_dir: a run directory is written in place; out_dir is for a GraphModule target")
    if tokenizer is not None:
        raise MaloraError("tokenizer: a run directory uses its base model's tokenizer; tokenizer is for a GraphModule")
    return None, read_adapter_config(target), Path(target)


def check_checkpoints(run_dir: Path, resume: bool) -> None:
    existing = complete_checkpoints(run_dir, verify=False)
    if resume and latest_checkpoint(run_dir) is None:
        raise MaloraError(f"resume: no complete checkpoint in {run_dir / 'checkpoints'}")
    if not resume and existing:
        raise MaloraError(
            f"{run_dir} already has checkpoints ({existing[-1].name}); pass resume=True to "
            "continue, or transform into a new run directory"
        )


def read_examples(data: Data, name: str) -> list[Example]:
    if isinstance(data, (str, os.PathLike)):
        return read_jsonl(Path(data))
    examples = [e for e in data if isinstance(e, Example)] if isinstance(data, Sequence) else []
    if not examples or len(examples) != len(data):
        raise MaloraError(f"{name}: expected a JSONL path or a non-empty list of malora_fx.training.data.Example")
    return examples


def run_fingerprint(args: TrainArgs, data: Data, examples: list[Example]) -> str:
    """A digest of the data and the settings a resumed run must share with the original."""
    keys = asdict(args)
    for volatile in ("resume", "device", "save_every", "keep"):
        keys.pop(volatile)
    if isinstance(data, (str, os.PathLike)):
        keys["data"] = hashlib.sha256(Path(data).read_bytes()).hexdigest()
    else:
        keys["data"] = hashlib.sha256(json.dumps([[e.task, e.messages] for e in examples]).encode()).hexdigest()
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]
