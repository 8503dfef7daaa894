"""Finding linear call sites in a captured graph.

A *linear site* is one call of a linear-like module: ``y = x Wᵀ + b`` with
input features n and output features m. Three shapes are recognised:

* ``aten.linear.default(x, W, b)`` in an exported graph, named by the module
  FQN in ``node.meta["nn_module_stack"]``;
* the nodes of one call of a GPT-2 ``Conv1D`` in an exported graph
  (``view → addmm → view``), grouped by their module-stack entry: the one
  tensor entering the group is x, the one node leaving it is y;
* ``call_module`` nodes of an ``nn.Linear`` / ``Conv1D`` in a
  ``torch.fx.symbolic_trace`` graph.

This module only finds; it never changes the graph.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import cast

import torch
from torch import fx, nn

from ..passes import PASS_TAG

_LINEAR_TARGETS = {torch.ops.aten.linear.default}
CONV1D_CLASS = "transformers.pytorch_utils.Conv1D"


@dataclass(frozen=True)
class LinearSite:
    """One call of a linear-like module: its name, input and output nodes, sizes."""

    fqn: str
    input: fx.Node
    output: fx.Node
    in_features: int
    out_features: int
    weight: str | None = None  # qualified name of the weight parameter, when found
    weight_transposed: bool = False  # True when stored [n, m] (Conv1D), False for [m, n] (Linear)


def _stack_top(node: fx.Node) -> tuple[str, str, str] | None:
    """``(stack key, module fqn, module class)`` of the innermost module of a node."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    key, (fqn, cls) = next(reversed(stack.items()))
    cls_name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
    return key, fqn, cls_name


def _last_dim(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dim() >= 1 and isinstance(val.shape[-1], int):
        return int(val.shape[-1])
    return None


def _is_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}" == CONV1D_CLASS


def _module_sizes(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        n, m = module.weight.shape  # type: ignore[misc]  # Conv1D stores [in, out]
        return int(n), int(m)
    return None


def _weight_sizes(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int]:
    """(n, m) of an ``aten.linear`` call from its weight ([m, n])."""
    weight = node.args[1]
    val = weight.meta.get("val") if isinstance(weight, fx.Node) else None
    if val is None and isinstance(weight, fx.Node) and weight.op == "get_attr":
        target = str(weight.target)
        val = gm.get_parameter(target) if _has_param(gm, target) else getattr(gm, target)
    if val is None:
        raise ValueError(f"{node.name}: the weight of this linear call has no known shape")
    m, n = val.shape
    return int(n), int(m)


def _has_param(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _conv1d_site(fqn: str, nodes: list[fx.Node]) -> LinearSite | None:
    """Group the nodes of one exported Conv1D call into a site, if unambiguous."""
    members = set(nodes)
    inputs = []
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in members and arg.op != "get_attr" and isinstance(arg.meta.get("val"), torch.Tensor):
                if arg not in inputs:
                    inputs.append(arg)
    outputs = [n for n in nodes if any(user not in members for user in n.users)]
    if len(inputs) != 1 or len(outputs) != 1:
        return None
    n, m = _last_dim(inputs[0]), _last_dim(outputs[0])
    if n is None or m is None:
        return None
    weights = [
        str(arg.target)
        for node in nodes
        for arg in node.all_input_nodes
        if arg.op == "get_attr" and getattr(arg.meta.get("val"), "shape", None) == (n, m)
    ]
    return LinearSite(fqn, inputs[0], outputs[0], n, m, weights[0] if len(weights) == 1 else None, True)


def find_linear_sites(gm: fx.GraphModule) -> list[LinearSite]:
    """Every linear call site of ``gm`` in graph order."""
    sites: list[LinearSite] = []
    conv_groups: OrderedDict[str, tuple[str, list[fx.Node]]] = OrderedDict()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _LINEAR_TARGETS:
            top = _stack_top(node)
            if top is None:
                continue
            n, m = _weight_sizes(gm, node)
            weight = (
                str(node.args[1].target)
                if isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr"
                else None
            )
            sites.append(LinearSite(top[1], cast(fx.Node, node.args[0]), node, n, m, weight, False))
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            sizes = _module_sizes(module)
            if sizes is not None:
                sites.append(
                    LinearSite(
                        str(node.target), node.args[0], node, *sizes, f"{node.target}.weight", _is_conv1d(module)
                    )
                )
        elif node.op == "call_function" and PASS_TAG not in node.meta:  # not a node a pass added
            top = _stack_top(node)
            if top is not None and top[2] == CONV1D_CLASS:
                conv_groups.setdefault(top[0], (top[1], []))[1].append(node)
    for fqn, nodes in conv_groups.values():
        site = _conv1d_site(fqn, nodes)
        if site is not None:
            sites.append(site)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    return sorted(sites, key=lambda s: order[s.output])


def linear_module_names(gm: fx.GraphModule) -> list[str]:
    """Distinct module names of the linear sites, in graph order."""
    return list(dict.fromkeys(site.fqn for site in find_linear_sites(gm)))
