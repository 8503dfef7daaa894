"""fold_adapters — the merge pass: fold what can be folded after training.

Matches: adapted sites, i.e. a linear output ``y`` marked
``meta["malora_fx.adapted"]`` whose only user is ``add(y, adapter(x))``::

    x ──► linear(x) ──► y ─┐                 lora:   x ──► linear'(x) ──► y'        (W' = W + s·B·A)
    └──► adapter(x) ──► a ─┴► add ──►   ⟹    routed: x ──► linear(x) ──► y ─┐
                                                     └──► folded(x) ──► a ─┴► add

Produces:
  * ``lora`` sites: the update folded into the base weight, ``W' = W + s·B·A``
    (transposed for GPT-2 ``Conv1D``), as a new parameter (the caller's model
    is not touched); the adapter call and the add disappear. A module called
    more than once (``l(x) + l(y)``, ``l(l(x))``) shares one adapter and one
    weight: its update is folded once and every one of its adapter calls
    dropped, exact since ``W'`` is the adapted map for every call.
  * with ``fold_lora=False``, LoRA calls are kept (marked merged) for
    lower_routing to lower as two matmuls.
  * routed sites: the adapter call retargeted to a
    :class:`malora_fx.adapters.folded.FoldedMixture` under ``gm.malora_folded`` with the
    scale folded into the up-projection and, for MALoRA, ``P_t`` folded into
    ``B_t`` where that is cheaper per token. Nothing routed folds into ``W``:
    the routing depends on the token.
  * the unused trainable adapter modules are deleted.

Why exact: ``s·B·A x = (s·B·A) x``, ``s·B_t (P_t z) = (s·B_t P_t) z`` and the
routing is unchanged; outputs agree up to float rounding (≤ 1e-5 relative in
the tests).

Requires: an adapted graph (merged and captured ones pass through: nothing
matches), not an annotated one. Ensures: a merged (or captured) graph: no
trainable adapter module is called except the LoRA calls kept by
``fold_lora=False``, each marked ``meta["malora_fx.merged"]``; running the
pass again matches nothing.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from malora_fx.adapters.folded import FoldedMixture, fold_mixture
from malora_fx.adapters.layers import AdapterLayer, LoRALayer, MixtureLayer
from malora_fx.graph.sites import LinearSite, find_linear_sites

from . import (
    ADAPTED,
    ADAPTED_KEY,
    ADAPTERS_ATTR,
    ANNOTATED,
    CAPTURED,
    FOLDED_ATTR,
    MERGED,
    MERGED_KEY,
    PASS_TAG,
    BasePass,
    PassResult,
    adapter_key,
)


def adapted_site_calls(gm: fx.GraphModule) -> list[tuple[LinearSite, fx.Node, fx.Node]]:
    """``(site, adapter call node, add node)`` of every adapted site still in adapter form."""
    found = []
    for site in find_linear_sites(gm):
        if not site.output.meta.get(ADAPTED_KEY) or len(site.output.users) != 1:
            continue
        (add,) = site.output.users
        delta = add.args[1] if len(add.args) == 2 else None
        if isinstance(delta, fx.Node) and delta.op == "call_module":
            found.append((site, delta, add))
    return found


class FoldAdapters(BasePass):
    """``fold_lora=False`` keeps LoRA sites as adapters (lowered later as two
    matmuls) so their weights stay separate, overridable tensors."""

    name = "fold_adapters"
    requires_states = (ADAPTED, MERGED, CAPTURED)
    refuses_states = (ANNOTATED,)
    ensures_states = (MERGED, CAPTURED)
    clears_states = (ADAPTED,)
    run_first = "run insert_adapters first"

    def __init__(self, fold_lora: bool = True) -> None:
        self.fold_lora = fold_lora

    def call(self, gm: fx.GraphModule) -> PassResult:
        matches = 0
        folded: set[str] = set()  # adapter modules whose LoRA update is already in the weight
        for site, call, add in adapted_site_calls(gm):
            layer = gm.get_submodule(str(call.target))
            if isinstance(layer, LoRALayer):
                if not self.fold_lora:
                    call.meta[MERGED_KEY] = True  # kept as it is: metadata only, not a rewrite
                    continue
                if str(call.target) not in folded:  # once per module, however often it is called
                    _fold_into_weight(gm, site, layer)
                    folded.add(str(call.target))
                add.replace_all_uses_with(site.output)
                gm.graph.erase_node(add)
                gm.graph.erase_node(call)
            elif isinstance(layer, MixtureLayer):
                call.target = _register_folded(gm, fold_mixture(layer))
                call.meta[PASS_TAG] = self.name
                call.meta[MERGED_KEY] = True
            else:
                continue
            matches += 1
        if matches:
            _drop_unused_adapters(gm)
        return PassResult(gm, modified=matches > 0, matches=matches)

    def ensures(self, gm: fx.GraphModule) -> None:
        kept = () if self.fold_lora else (LoRALayer,)
        for node in gm.graph.nodes:
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(module, AdapterLayer) and not isinstance(module, kept):
                raise AssertionError(f"fold_adapters left a trainable adapter call: {node.target}")


@torch.no_grad()
def _fold_into_weight(gm: fx.GraphModule, site: LinearSite, layer: LoRALayer) -> None:
    if site.weight is None:
        raise ValueError(f"{site.fqn}: cannot find the base weight to fold the LoRA update into")
    owner_name, _, attr = site.weight.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    weight = getattr(owner, attr)
    update = (layer.B @ layer.A) * layer.scale
    if site.weight_transposed:
        update = update.T
    folded = nn.Parameter(weight.detach() + update.to(weight.dtype), requires_grad=False)
    setattr(owner, attr, folded)


def _register_folded(gm: fx.GraphModule, folded: FoldedMixture) -> str:
    container = getattr(gm, FOLDED_ATTR, None)
    if container is None:
        container = nn.ModuleDict()
        gm.add_submodule(FOLDED_ATTR, container)
    key = adapter_key(folded.fqn)
    container[key] = folded
    return f"{FOLDED_ATTR}.{key}"


def _drop_unused_adapters(gm: fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    container = getattr(gm, ADAPTERS_ATTR, None)
    if container is None:
        return
    for key in list(container.keys()):
        if f"{ADAPTERS_ATTR}.{key}" not in used:
            del container[key]
    if len(container) == 0:
        delattr(gm, ADAPTERS_ATTR)
