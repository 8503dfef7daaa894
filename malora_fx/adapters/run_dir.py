"""Run directories: a base model plus the adapter files `malora-fx transform` / `train` wrote."""

from __future__ import annotations

import os
from typing import Any

from torch import fx

from ..errors import MaloraError
from ..graph.sources import LoadedModel, load_model
from .files import config_from_file, load_adapters, read_adapter_config
from .transform import set_adapters_training, transform


def load_run(run_dir: str | os.PathLike, example_kwargs: dict[str, Any] | None = None) -> tuple[fx.GraphModule, LoadedModel]:
    """The run's base model transformed with its adapters (eval mode), and the loaded base model."""
    data = read_adapter_config(run_dir)
    loaded = load_model(data["base_model"])
    if loaded.tokenizer is None:
        raise MaloraError(f"base model {data['base_model']!r} has no tokenizer")
    gm = transform(loaded.model, config_from_file(data), example_kwargs)
    load_adapters(gm, run_dir)
    set_adapters_training(gm, False)
    return gm, loaded
