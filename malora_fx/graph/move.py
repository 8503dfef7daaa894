"""Move a captured graph to another device, device literals included.

A graph captured by ``torch.export`` on one device keeps that device as literals in its nodes:
``aten.arange(..., device=cpu)`` for positions and masks, ``aten.to.device(x, cpu, ...)``,
``aten._assert_tensor_metadata(..., device=cpu)``; and it may read tensor constants that are plain
attributes (``lifted_tensor_*``). ``GraphModule.to(device)`` moves parameters and buffers but none
of those, so the moved graph mixes devices and fails at its first such node
("Tensor device mismatch"). :func:`move_to_device` rewrites them as well.
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate

__all__ = ["move_to_device"]


def _retarget(value, device: torch.device):
    return device if isinstance(value, torch.device) else value


def _move_plain_constants(gm: fx.GraphModule, device: torch.device) -> None:
    """Tensors a ``get_attr`` reads that are plain attributes (``lifted_tensor_*``, e.g. a cache's
    empty start), neither parameters nor buffers: ``Module.to`` leaves them where they are."""
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        owner_name, _, name = str(node.target).rpartition(".")
        owner = gm.get_submodule(owner_name)
        value = getattr(owner, name, None)
        if isinstance(value, torch.Tensor) and name not in owner._parameters and name not in owner._buffers:
            setattr(owner, name, value.to(device))


def _retarget_graph(gm: fx.GraphModule, device: torch.device) -> None:
    _move_plain_constants(gm, device)
    changed = False
    for node in gm.graph.nodes:
        args = map_aggregate(node.args, lambda v: _retarget(v, device))
        kwargs = map_aggregate(node.kwargs, lambda v: _retarget(v, device))
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs, changed = args, kwargs, True
    if changed:
        gm.recompile()


def move_to_device(module: nn.Module, device: torch.device | str) -> nn.Module:
    """``module.to(device)``; in every :class:`torch.fx.GraphModule` within ``module`` (itself, and the
    bodies of higher-order ops such as ``wrap_with_autocast``), every ``torch.device`` in the nodes'
    arguments becomes ``device`` first (a graph is recompiled when one changed), and the plain tensor
    attributes its ``get_attr`` nodes read are moved. Returns ``module``.

    A plain module (the eager model) is only moved: its code computes devices from its inputs."""
    device = torch.device(device)
    for graph_module in module.modules():  # the top graph and the bodies of its higher-order ops
        if isinstance(graph_module, fx.GraphModule):
            _retarget_graph(graph_module, device)
    return module.to(device)
