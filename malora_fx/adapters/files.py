"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``.

The format (``"format": "malora-fx/1"``) is a contract other tools read:

* ``adapter_config.json``: format, method, base_model, num_experts, top_k,
  rank (r̄ for MALoRA), shared_rank (d), alpha, beta, dropout,
  normalize_top_k, aux_loss_coef, seed, targets, and
  ``sites = {fqn: {"in_features": n, "out_features": m}}``.
* ``adapter_model.safetensors``: per site ``<fqn>.<name>`` with the shapes of
  ``malora_fx.adapters.layers`` (``S``/``P``/``B``/``router`` for MALoRA, ...).

Files are written to temporary names and renamed, so a reader never sees a
half-written file. Loading checks method, site list and every shape before
copying anything, and never unpickles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import fx, nn

from ..errors import AdapterFileError, ConfigError
from ..fileio import atomic_write
from ..passes import STATE_KEY, adapter_modules
from .config import MALoRAConfig
from .transform import get_config

FORMAT = "malora-fx/1"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_CONFIG_KEYS = (
    "method",
    "num_experts",
    "top_k",
    "rank",
    "shared_rank",
    "alpha",
    "beta",
    "dropout",
    "normalize_top_k",
    "aux_loss_coef",
    "seed",
    "targets",
)


def adapter_config_dict(gm: fx.GraphModule, base_model: str | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` content for the adapters of ``gm``."""
    config = get_config(gm)
    data = config.to_dict()
    return {
        "format": FORMAT,
        "base_model": base_model if base_model is not None else gm.meta[STATE_KEY].get("base_model"),
        **{key: data[key] for key in _CONFIG_KEYS},
        "sites": {fqn: dict(site) for fqn, site in gm.meta[STATE_KEY]["sites"].items()},
    }


def adapter_state_dict(gm: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<fqn>.<name>": tensor}`` of every adapter, in file layout."""
    return {
        f"{fqn}.{name}": tensor.detach()
        for fqn, layer in adapter_modules(gm).items()
        for name, tensor in layer.file_tensors().items()
    }


def save_adapters(gm: fx.GraphModule, directory: str | os.PathLike, base_model: str | None = None) -> Path:
    """Write the adapters of ``gm`` to ``directory`` (created if needed).

    Example:
        >>> save_adapters(gm, "runs/qv")   # adapter_config.json + adapter_model.safetensors
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = adapter_config_dict(gm, base_model)
    tensors = {k: v.to("cpu").contiguous() for k, v in adapter_state_dict(gm).items()}
    atomic_write(directory / WEIGHTS_FILE, lambda path: save_file(tensors, str(path), metadata={"format": FORMAT}))
    atomic_write(directory / CONFIG_FILE, lambda path: path.write_text(json.dumps(config, indent=2) + "\n"))
    return directory


_FILE_KEYS = ("format", "base_model", *_CONFIG_KEYS, "sites")
_OPTIONAL_KEYS = ("imported_from",)  # written by import-peft, informational


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``adapter_config.json`` of an adapter directory.

    Strict, like the format it reads: a format other than ``malora-fx/1`` (a newer one
    included), an unknown key (a typo in a hand-edited file) or a missing key is an
    :class:`AdapterFileError` naming it and the file.
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise AdapterFileError(f"{directory}: no {CONFIG_FILE} (not a malora-fx adapter directory)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    found = data.get("format")
    if found != FORMAT:
        if isinstance(found, str) and found.startswith("malora-fx/"):
            raise AdapterFileError(
                f"{path}: format {found!r} is not supported by this malora-fx (a newer or unknown version); "
                f"supported: {FORMAT!r}"
            )
        raise AdapterFileError(f"{path}: format is {found!r}; expected {FORMAT!r}")
    unknown = sorted(str(k) for k in data if k not in _FILE_KEYS and k not in _OPTIONAL_KEYS)
    if unknown:
        raise AdapterFileError(
            f"{path}: unknown key {unknown[0]!r}"
            + (f" (and {', '.join(map(repr, unknown[1:]))})" if len(unknown) > 1 else "")
            + f"; allowed: {', '.join(_FILE_KEYS + _OPTIONAL_KEYS)}"
        )
    missing = [k for k in _FILE_KEYS if k not in data]
    if missing:
        raise AdapterFileError(f"{path}: missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    if not isinstance(data["sites"], dict):
        raise AdapterFileError(f"{path}: sites must be an object {{fqn: {{in_features, out_features}}}}")
    config_from_file(data, source=str(path))  # invalid values are refused here, naming the file
    return data


def config_from_file(data: dict[str, Any], source: str | None = None) -> MALoRAConfig:
    """The :class:`MALoRAConfig` an adapter config describes (invalid values name ``source``)."""
    try:
        return MALoRAConfig.from_dict({k: data[k] for k in _CONFIG_KEYS if k in data}, source=source)
    except ConfigError as exc:
        message = str(exc)
        if source and not message.startswith(source):
            message = f"{source}: {message}"
        raise AdapterFileError(message) from None


def load_adapters(gm: fx.GraphModule, directory: str | os.PathLike) -> None:
    """Load adapter files into the adapters of ``gm`` (in place).

    Method, site list and every tensor shape must match ``gm``; the first
    mismatch raises :class:`AdapterFileError` and nothing is copied.

    Example:
        >>> load_adapters(gm, "runs/qv")
    """
    data = read_adapter_config(directory)
    layers = adapter_modules(gm)
    config = get_config(gm)
    if data.get("method") != config.method:
        raise AdapterFileError(
            f"{directory}: adapters are method {data.get('method')!r}, the model has {config.method!r}"
        )
    _check_sites(directory, data.get("sites", {}), gm.meta[STATE_KEY]["sites"])
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterFileError(f"{directory}: no {WEIGHTS_FILE}")
    expected = {f"{fqn}.{name}": t for fqn, layer in layers.items() for name, t in layer.file_tensors().items()}
    try:
        handle_cm = safe_open(str(weights), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for empty, truncated or corrupt files
        raise AdapterFileError(
            f"{weights}: not a readable safetensors file ({str(exc).splitlines()[0][:160]}); "
            f"expected the {WEIGHTS_FILE} that save_adapters writes"
        ) from None
    with handle_cm as handle:
        keys = set(handle.keys())
        for key, target in expected.items():
            if key not in keys:
                raise AdapterFileError(f"{weights}: missing tensor {key!r}")
            shape = tuple(handle.get_slice(key).get_shape())
            if shape != tuple(target.shape):
                raise AdapterFileError(
                    f"{weights}: {key} has shape {list(shape)}, the model needs {list(target.shape)}"
                )
        extra = sorted(keys - set(expected))
        if extra:
            raise AdapterFileError(f"{weights}: tensor {extra[0]!r} belongs to no adapted site of this model")
        with torch.no_grad():
            for key, target in expected.items():
                target.copy_(handle.get_tensor(key))


def _check_sites(directory, file_sites: dict[str, Any], model_sites: dict[str, Any]) -> None:
    for fqn in model_sites:
        if fqn not in file_sites:
            raise AdapterFileError(f"{directory}: no adapter for site {fqn!r} of the model")
    for fqn, site in file_sites.items():
        if fqn not in model_sites:
            raise AdapterFileError(f"{directory}: site {fqn!r} is not adapted in the model")
        if dict(site) != model_sites[fqn]:
            raise AdapterFileError(
                f"{directory}: site {fqn!r} is {dict(site)} in the file, {model_sites[fqn]} in the model"
            )
