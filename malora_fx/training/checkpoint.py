"""Training checkpoints that survive a crash.

A checkpoint is a directory ``checkpoints/step-00000042/`` holding

* ``adapter_config.json`` + ``adapter_model.safetensors`` (the adapters),
* ``optimizer.safetensors`` (AdamW moments and step counts, by parameter index),
* ``rng.safetensors`` (torch CPU and CUDA generator states),
* ``trainer_state.json`` (step, run fingerprint, scheduler position, totals),
* ``manifest.json``, written last: every file's size and SHA-256.

It is built under a temporary name and renamed into place, so a kill leaves at
most a ``.tmp-*`` directory, which is never loaded and is removed by the next
save. :func:`latest_checkpoint` also verifies the manifest, so a damaged
checkpoint is skipped, never loaded. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..fileio import atomic_directory

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
_NAME = re.compile(r"step-(\d{8})")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state as flat tensors ``state.{index}.{name}`` (no pickle)."""
    out = {}
    for index, value in optimizer.state_dict()["state"].items():
        for name, tensor in value.items():
            out[f"state.{index}.{name}"] = torch.as_tensor(tensor).detach().cpu().contiguous()
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`optimizer_tensors` (the param groups come from the live optimizer)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = state
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    write_adapters,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically, then keep only the newest ``keep``.

    ``write_adapters(directory)`` writes the adapter files. An existing
    checkpoint of the same step is never overwritten.
    """
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    if final.exists():
        raise FileExistsError(f"checkpoint {final} already exists; refusing to overwrite it")
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_directory(final, replace=False) as tmp:
        write_adapters(tmp)
        save_file(optimizer_tensors(optimizer), str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors(), str(tmp / "rng.safetensors"))
        (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=2) + "\n")
        manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    for old in complete_checkpoints(run_dir, verify=False)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_complete(directory: Path) -> bool:
    """Whether every file in the manifest is present with its size and hash."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        return bool(manifest) and all(
            (directory / name).stat().st_size == meta["bytes"] and _sha256(directory / name) == meta["sha256"]
            for name, meta in manifest.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def complete_checkpoints(run_dir: str | Path, *, verify: bool = True) -> list[Path]:
    """Checkpoint directories in step order (only verified ones when ``verify``)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = sorted(p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))
    if not verify:
        return found
    good = []
    for path in found:
        if is_complete(path):
            good.append(path)
        else:
            logger.warning("ignoring damaged checkpoint %s", path)
    return good


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def read_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(trainer_state, optimizer tensors, rng tensors)`` of a checkpoint."""
    state = json.loads((directory / STATE).read_text())
    return state, load_file(str(directory / "optimizer.safetensors")), load_file(str(directory / "rng.safetensors"))
