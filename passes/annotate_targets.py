"""annotate_targets — mark the linear sites to adapt (policy only).

Matches: every linear call site of the graph (see ``malora_fx.graph.sites``) whose
module name the selection accepts::

    x ──► linear(x, W, b) ──► y        (or a Conv1D / nn.Linear call)
              ▲ fqn "model.layers.0.self_attn.q_proj"

Selections: ``"all-linear"`` (every site except the output heads recorded at
capture in ``gm.meta["malora_fx.output_heads"]``, ``lm_head`` by default),
``"re:<regex>"`` (full match on the FQN) or a tuple of suffixes (``q_proj``
matches ``...self_attn.q_proj``).

Produces: ``y.meta["malora_fx.target"] = AdapterTarget(fqn, input, n, m)``.
The graph itself is untouched, so this pass never "modifies"; ``matches`` is the
number of newly annotated sites.

Requires: a captured graph. Ensures: at least one site is annotated or already
adapted; otherwise raises ``TargetError`` listing the model's linear modules.
Idempotent: sites already annotated or adapted are not counted again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import fx

from malora_fx.adapters.config import ALL_LINEAR, REGEX_PREFIX
from malora_fx.errors import TargetError
from malora_fx.graph.sites import LinearSite, find_linear_sites, linear_module_names

from . import (
    ADAPTED_KEY,
    DEFAULT_OUTPUT_HEADS,
    OUTPUT_HEADS_KEY,
    TARGET_KEY,
    BasePass,
    PassResult,
)


@dataclass(frozen=True)
class AdapterTarget:
    """The annotation the insertion pass consumes."""

    fqn: str
    input_name: str
    in_features: int
    out_features: int


def selects(targets, fqn: str, output_heads: tuple[str, ...]) -> bool:
    """Whether the target selection accepts module ``fqn``."""
    if targets == ALL_LINEAR:
        return not any(fqn == head or fqn.endswith("." + head) for head in output_heads)
    if isinstance(targets, str) and targets.startswith(REGEX_PREFIX):
        return re.fullmatch(targets[len(REGEX_PREFIX) :], fqn) is not None
    return any(fqn == suffix or fqn.endswith("." + suffix) for suffix in targets)


class AnnotateTargets(BasePass):
    name = "annotate_targets"

    def __init__(self, targets) -> None:
        self.targets = targets

    def call(self, gm: fx.GraphModule) -> PassResult:
        heads = tuple(gm.meta.get(OUTPUT_HEADS_KEY, DEFAULT_OUTPUT_HEADS))
        new = 0
        for site in find_linear_sites(gm):
            if site.output.meta.get(ADAPTED_KEY) or TARGET_KEY in site.output.meta:
                continue
            if selects(self.targets, site.fqn, heads):
                site.output.meta[TARGET_KEY] = _annotation(site)
                new += 1
        return PassResult(gm, modified=False, matches=new)

    def ensures(self, gm: fx.GraphModule) -> None:
        if any(TARGET_KEY in n.meta or n.meta.get(ADAPTED_KEY) for n in gm.graph.nodes):
            return
        names = linear_module_names(gm)
        shown = ", ".join(names[:40]) + (f", … ({len(names)} in all)" if len(names) > 40 else "")
        raise TargetError(
            f"targets {_describe(self.targets)} match no linear module; the model's linear modules are: "
            f"{shown or '(none)'}"
        )


def _annotation(site: LinearSite) -> AdapterTarget:
    return AdapterTarget(site.fqn, site.input.name, site.in_features, site.out_features)


def _describe(targets) -> str:
    return repr(targets if isinstance(targets, str) else ",".join(targets))
