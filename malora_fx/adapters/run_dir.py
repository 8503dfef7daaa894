"""Run directories: a base model plus the adapter files `malora-fx transform` / `train` wrote.

Every consumer of a run directory opens it here: :func:`read_run` gives the
checked ``adapter_config.json`` and the loaded base model (as stored: the
caller picks dtype and capture), :func:`apply_run_adapters` inserts the run's
adapters into a model or captured graph and loads their trained tensors, and
:func:`load_run` is both at once for PyTorch use (eval, generate, train).
"""

from __future__ import annotations

import os
from typing import Any

from torch import fx, nn

from ..errors import MaloraError
from ..graph.sources import LoadedModel, load_model
from .files import config_from_file, load_adapters, read_adapter_config
from .layers import weights_loaded_next
from .transform import set_adapters_training, transform


def read_run(run_dir: str | os.PathLike) -> tuple[dict[str, Any], LoadedModel]:
    """The run's checked adapter config (``adapter_config.json``) and its base model, loaded."""
    data = read_adapter_config(run_dir)
    return data, load_model(data["base_model"])


def apply_run_adapters(
    model: nn.Module | fx.GraphModule,
    run_dir: str | os.PathLike,
    data: dict[str, Any],
    example_kwargs: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """``model`` (captured first unless a GraphModule) with the run's adapters inserted, loaded, in eval mode.

    ``data`` is the run's adapter config, as :func:`read_run` returns it.
    """
    with weights_loaded_next():  # load_adapters replaces every adapter tensor, or raises
        gm = transform(model, config_from_file(data), example_kwargs)
    load_adapters(gm, run_dir)
    set_adapters_training(gm, False)
    return gm


def load_run(
    run_dir: str | os.PathLike, example_kwargs: dict[str, Any] | None = None
) -> tuple[fx.GraphModule, LoadedModel]:
    """The run's base model transformed with its adapters (eval mode), and the loaded base model."""
    data, loaded = read_run(run_dir)
    if loaded.tokenizer is None:
        raise MaloraError(f"base model {data['base_model']!r} has no tokenizer")
    return apply_run_adapters(loaded.model, run_dir, data, example_kwargs), loaded
