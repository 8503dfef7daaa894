"""insert_adapters — rewrite each annotated linear site into base + adapter.

Matches: nodes carrying ``meta["malora_fx.target"]`` (from annotate_targets)::

    x ──► linear(x) ──► y ──► users          x ──► linear(x) ──► y ─┐
                                      ⟹      └──► adapter(x) ──► a ─┴► add(y, a) ──► users

Produces: one adapter submodule per module name under ``gm.malora_adapters``
(a ``ModuleDict``; keys are the FQNs with ``.`` → ``__``; a module called twice
shares one adapter), a ``call_module`` node for it and an ``aten.add`` node,
both placed right after ``y`` (topological order), both carrying ``y``'s
``val`` / ``nn_module_stack`` / ``stack_trace`` and the tag
``meta["malora_fx.pass"] = "insert_adapters"``. The config, the site table and
the base parameter count are recorded in ``gm.meta["malora_fx"]``.

The adapter reads the linear's input as it is when the site is rewired, not
the node recorded at annotation: when that input is itself an adapted linear
output (``b(a(x))`` with both adapted, or ``l(l(x))``), the adapter reads the
adapted value ``y_a + Δ_a``, as the eager model with adapters would.

Why exact: the base path is untouched and ``B = 0`` at init, so the adapted
graph equals the base graph until the adapters are trained.

Requires: an annotated graph (or an adapted one: running again matches
nothing), not merged or fused; every annotated site fits the method (MALoRA:
``shared_rank <= n``), checked for all sites before anything changes.
Ensures: an adapted graph with no annotation left; every adapted site is
marked ``meta["malora_fx.adapted"] = fqn``, so running the pass again matches
nothing (idempotent).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from malora_fx.adapters.config import MALoRAConfig
from malora_fx.adapters.layers import AdapterLayer, make_layer
from malora_fx.errors import ConfigError

from . import (
    ADAPTED,
    ADAPTED_KEY,
    ADAPTERS_ATTR,
    ANNOTATED,
    FUSED,
    MERGED,
    PASS_TAG,
    STATE_KEY,
    TARGET_KEY,
    BasePass,
    PassResult,
    adapter_key,
    tag_node,
)
from .annotate_targets import AdapterTarget


class InsertAdapters(BasePass):
    name = "insert_adapters"
    requires_states = (ANNOTATED, ADAPTED)
    refuses_states = (MERGED, FUSED)
    ensures_states = (ADAPTED,)
    clears_states = (ANNOTATED,)
    run_first = "run annotate_targets first"

    def __init__(self, config: MALoRAConfig) -> None:
        self.config = config

    def requires(self, gm: fx.GraphModule) -> None:
        if self.config.shared_rank is None:  # only MALoRA has a shared rank
            return
        for target in _targets(gm):
            if self.config.shared_rank > target.in_features:
                raise ConfigError(
                    f"shared_rank: {self.config.shared_rank} is larger than in_features={target.in_features} "
                    f"of {target.fqn}; allowed: 1..{target.in_features}"
                )

    def call(self, gm: fx.GraphModule) -> PassResult:
        state = gm.meta.setdefault(STATE_KEY, {})
        previous = state.get("config")
        if previous is not None and previous != self.config and any(TARGET_KEY in n.meta for n in gm.graph.nodes):
            raise ConfigError("this graph already carries adapters of another config; capture the model again")
        container = _container(gm)
        nodes = {node.name: node for node in gm.graph.nodes}
        matches = 0
        for output in [n for n in gm.graph.nodes if TARGET_KEY in n.meta]:
            target: AdapterTarget = output.meta.pop(TARGET_KEY)
            key = adapter_key(target.fqn)
            if key not in container:
                container[key] = self._new_layer(gm, target, output)
            self._rewire(gm, _current_value(nodes[target.input_name]), output, f"{ADAPTERS_ATTR}.{key}")
            output.meta[ADAPTED_KEY] = target.fqn
            matches += 1
        if matches:
            state["config"] = self.config
            state["sites"] = {
                layer.fqn: {"in_features": layer.in_features, "out_features": layer.out_features}
                for layer in container.values()
            }
        return PassResult(gm, modified=matches > 0, matches=matches)

    def ensures(self, gm: fx.GraphModule) -> None:
        left = [n.name for n in gm.graph.nodes if TARGET_KEY in n.meta]
        if left:
            raise AssertionError(f"insert_adapters left annotated nodes behind: {left}")

    def _new_layer(self, gm: fx.GraphModule, target: AdapterTarget, output: fx.Node) -> AdapterLayer:
        layer = make_layer(target.in_features, target.out_features, self.config, target.fqn)
        return layer.to(device=_site_device(gm, output))

    @staticmethod
    def _rewire(gm: fx.GraphModule, x: fx.Node, y: fx.Node, module_target: str) -> None:
        graph = gm.graph
        with graph.inserting_after(y):
            delta = graph.call_module(module_target, (x,))
        with graph.inserting_after(delta):
            total = graph.call_function(torch.ops.aten.add.Tensor, (y, delta))
        tag_node(delta, y, InsertAdapters.name)
        tag_node(total, y, InsertAdapters.name)
        y.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)


def _current_value(x: fx.Node) -> fx.Node:
    """What now stands for ``x`` in the graph: when ``x`` is an adapted linear output,
    its users were moved to ``add(x, adapter(...))``, so the value is that add."""
    while x.meta.get(ADAPTED_KEY):
        adds = [
            user
            for user in x.users
            if user.meta.get(PASS_TAG) == InsertAdapters.name
            and user.target is torch.ops.aten.add.Tensor
            and user.args[0] is x
        ]
        if len(adds) != 1:
            break
        x = adds[0]
    return x


def _targets(gm: fx.GraphModule) -> list[AdapterTarget]:
    return [n.meta[TARGET_KEY] for n in gm.graph.nodes if TARGET_KEY in n.meta]


def _container(gm: fx.GraphModule) -> nn.ModuleDict:
    container = getattr(gm, ADAPTERS_ATTR, None)
    if container is None:
        container = nn.ModuleDict()
        gm.add_submodule(ADAPTERS_ATTR, container)
    return container


def _site_device(gm: fx.GraphModule, output: fx.Node) -> torch.device:
    """The device the adapter lives on: the site's, or CPU for meta / unknown."""
    val = output.meta.get("val")
    device = getattr(val, "device", None)
    if device is None:
        params = list(gm.parameters())
        device = params[0].device if params else torch.device("cpu")
    return torch.device("cpu") if device.type == "meta" else device
