"""transform — the public pipeline: capture, annotate, insert; and the helpers
that act on a transformed GraphModule (aux loss, trainable parameters,
train/eval switching of the adapters)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx, nn

from ..graph.capture import capture
from ..passes import (
    STATE_KEY,
    TARGET_KEY,
    adapter_modules,
    run_passes,
    transform_pipeline,
)
from .config import MALoRAConfig
from .layers import AdapterLayer, MixtureLayer
from .routing import balance_from_sums

logger = logging.getLogger(__name__)


def transform(
    model: nn.Module | fx.GraphModule,
    config: MALoRAConfig | None = None,
    example_kwargs: dict[str, Any] | None = None,
    **capture_options: Any,
) -> fx.GraphModule:
    """Insert adapters into ``model`` and return the adapted GraphModule.

    ``model`` is captured first (see :func:`malora_fx.graph.capture`) unless it is
    already a GraphModule. The base parameters are frozen; only the adapters
    train. The adapters start in training mode (dropout active); see
    :func:`set_adapters_training`.

    Example:
        >>> gm = transform(model, MALoRAConfig(targets="q_proj,v_proj"), example_kwargs=batch)
        >>> out = gm(**batch)   # equals model(**batch) at init: B = 0
    """
    config = config or MALoRAConfig()
    gm = model if isinstance(model, fx.GraphModule) else capture(model, example_kwargs, **capture_options)
    run_passes(gm, transform_pipeline(config))
    freeze_base(gm)
    return gm


def plan(
    model: nn.Module | fx.GraphModule,
    config: MALoRAConfig | None = None,
    example_kwargs: dict[str, Any] | None = None,
    **capture_options: Any,
) -> tuple[fx.GraphModule, dict[str, dict[str, int]]]:
    """Select and check the sites ``transform`` would adapt, without inserting.

    Returns the captured (annotated, otherwise unchanged) graph and
    ``{fqn: {"in_features": n, "out_features": m}}``. Used by dry runs: no
    adapter weights are allocated, so it works for models built on the meta
    device at any size.
    """
    config = config or MALoRAConfig()
    gm = model if isinstance(model, fx.GraphModule) else capture(model, example_kwargs, **capture_options)
    annotate, insert = transform_pipeline(config)
    run_passes(gm, [annotate])
    insert.requires(gm)
    sites = {}
    for node in gm.graph.nodes:
        target = node.meta.get(TARGET_KEY)
        if target is not None:
            sites[target.fqn] = {"in_features": target.in_features, "out_features": target.out_features}
    return gm, sites


def freeze_base(gm: nn.Module) -> None:
    """``requires_grad`` off for every parameter but the adapters'."""
    for param in gm.parameters():
        param.requires_grad_(False)
    for param in trainable_parameters(gm):
        param.requires_grad_(True)


def adapter_layers(gm: nn.Module) -> dict[str, AdapterLayer]:
    """``{site fqn: adapter layer}`` of a transformed module."""
    return adapter_modules(gm)


def trainable_parameters(gm: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters, and only them (router weights included)."""
    return [p for layer in adapter_modules(gm).values() for p in layer.parameters()]


def get_config(gm: nn.Module) -> MALoRAConfig:
    """The config the adapters of ``gm`` were inserted with."""
    state = getattr(gm, "meta", {}).get(STATE_KEY)
    if not state or "config" not in state:
        raise ValueError("this module has no malora-fx adapters; call malora_fx.adapters.transform first")
    return state["config"]


def set_adapters_training(gm: nn.Module, training: bool = True) -> None:
    """Switch the adapters between training (dropout on) and eval mode.

    ``torch.export`` modules refuse ``.train()`` / ``.eval()``; this sets the
    flag on the adapter submodules only. Base-model dropout is not affected: it
    was fixed when the model was captured (eval mode, i.e. off).
    """
    for layer in adapter_modules(gm).values():
        layer.train(training)


def aux_loss(
    gm: nn.Module,
    attention_mask: torch.Tensor | None = None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean load-balancing loss over the routed sites, from the last forward.

    The value is unscaled (``N · Σ_t f_t p̄_t``; ``top_k`` when perfectly
    balanced); training multiplies it by ``config.aux_loss_coef``. Pass the
    batch's ``attention_mask`` ([batch, seq]) to count real tokens only. Methods
    without a router (``lora``) give 0.

    ``all_reduce`` (data parallel: sums a tensor over ranks, no autograd) makes
    the loss global: the routing fractions and token counts are summed over
    ranks, the probabilities stay local, so each rank returns its share and the
    shares add up to the loss (and gradient) of the whole global batch.
    """
    losses = []
    for layer in _routed(adapter_modules(gm).values()):
        chosen_sum, prob_sum, count = layer.router_sums(attention_mask)
        if all_reduce is not None:
            chosen_sum, count = all_reduce(chosen_sum.detach()), all_reduce(count.detach())
        losses.append(balance_from_sums(chosen_sum, prob_sum, count))
    if not losses:
        return torch.zeros(())
    return torch.stack(losses).mean()


def _routed(layers: Iterable[AdapterLayer]) -> list[MixtureLayer]:
    return [layer for layer in layers if isinstance(layer, MixtureLayer)]
