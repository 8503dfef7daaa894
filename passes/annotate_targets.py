"""annotate_targets — mark the linear sites to adapt (policy only).

Matches: every linear call site of the graph (see ``malora_fx.graph.sites``) whose
module name the selection accepts::

    x ──► linear(x, W, b) ──► y        (or a Conv1D / nn.Linear call)
              ▲ fqn "model.layers.0.self_attn.q_proj"

Selections (``targets``, read by :func:`malora_fx.adapters.config.parse_targets`
with PEFT's ``target_modules`` meaning): ``"all-linear"`` (every site except the
output heads recorded at capture in ``gm.meta["malora_fx.output_heads"]``,
``lm_head`` by default), a regular expression (``"re:<regex>"``, or a string
with regex metacharacters; full match on the FQN) or a tuple of module names
(``q_proj`` matches ``q_proj`` and ``...self_attn.q_proj``); a tuple holding
``"all-linear"`` adds its other names to all-linear.

Produces: ``y.meta["malora_fx.target"] = AdapterTarget(fqn, input, n, m)``.
The graph itself is untouched, so this pass never "modifies"; ``matches`` is the
number of newly annotated sites.

Requires: a captured or adapted graph, not merged or fused (states in
``passes/__init__.py``). Ensures: at least one site is annotated or already
adapted; otherwise raises ``TargetError`` naming the form the selection was
read as and listing the model's linear modules. Idempotent: sites already
annotated or adapted are not counted again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import fx

from malora_fx.adapters.config import ALL_LINEAR, REGEX_PREFIX, parse_targets
from malora_fx.errors import TargetError
from malora_fx.graph.sites import LinearSite, find_linear_sites, linear_module_names

from . import (
    ADAPTED,
    ADAPTED_KEY,
    ANNOTATED,
    CAPTURED,
    DEFAULT_OUTPUT_HEADS,
    FUSED,
    MERGED,
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


def _named(fqn: str, name: str) -> bool:
    """PEFT's list rule: ``fqn`` is ``name`` or ends with ``"." + name``."""
    return fqn == name or fqn.endswith("." + name)


def selects(targets, fqn: str, output_heads: tuple[str, ...]) -> bool:
    """Whether the target selection (as :func:`parse_targets` returns it) accepts module ``fqn``."""
    if targets == ALL_LINEAR:
        return not any(_named(fqn, head) for head in output_heads)
    if isinstance(targets, str) and targets.startswith(REGEX_PREFIX):
        return re.fullmatch(targets[len(REGEX_PREFIX) :], fqn) is not None
    if ALL_LINEAR in targets and selects(ALL_LINEAR, fqn, output_heads):
        return True
    return any(_named(fqn, name) for name in targets if name != ALL_LINEAR)


def describe_targets(targets) -> str:
    """``targets ['q_proj'] (read as: ...)``: the selection and the form it was read as."""
    if targets == ALL_LINEAR:
        return f"targets {targets!r} (read as: all linear layers except output heads)"
    if isinstance(targets, str):
        return f"targets {targets!r} (read as: a regular expression matched in full against module names)"
    names = [t for t in targets if t != ALL_LINEAR]
    if ALL_LINEAR in targets:
        return f"targets {list(targets)!r} (read as: all linear layers except output heads, plus {names!r})"
    rule = "a module matches a name when its full name is the name or ends with '.' + name"
    return f"targets {list(targets)!r} (read as: module names; {rule})"


class AnnotateTargets(BasePass):
    name = "annotate_targets"
    requires_states = (CAPTURED, ADAPTED)
    refuses_states = (MERGED, FUSED)
    ensures_states = (ANNOTATED, ADAPTED)
    run_first = "capture the model again"

    def __init__(self, targets) -> None:
        self.targets = parse_targets(targets)

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
            f"{describe_targets(self.targets)} match no linear module; the model's linear modules are: "
            f"{shown or '(none)'}"
        )


def _annotation(site: LinearSite) -> AdapterTarget:
    return AdapterTarget(site.fqn, site.input.name, site.in_features, site.out_features)
