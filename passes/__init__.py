"""Graph passes of malora-fx, imported as ``malora_fx.passes``.

A pass is a small object with ``name``, ``requires(gm)`` (raises if the graph
is not fit for it), ``call(gm) -> PassResult`` (the rewrite) and
``ensures(gm)`` (checks what it promised). :func:`run_passes` runs an ordered
list, cleans up after every pass that changed the graph (dead-code
elimination → lint → recompile) and logs one line per pass.

The pipelines a reader needs to see are built by the functions at the bottom
of this file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol, Sequence

from torch import fx

logger = logging.getLogger(__name__)

PASS_TAG = "malora_fx.pass"


@dataclass(frozen=True)
class PassResult:
    """What a pass did: the (same) module, whether it changed, how many matches."""

    module: fx.GraphModule
    modified: bool
    matches: int = 0


class GraphPass(Protocol):
    name: str

    def requires(self, gm: fx.GraphModule) -> None: ...

    def call(self, gm: fx.GraphModule) -> PassResult: ...

    def ensures(self, gm: fx.GraphModule) -> None: ...


class BasePass:
    """Default no-op ``requires`` / ``ensures`` and the call protocol."""

    name = "pass"

    def requires(self, gm: fx.GraphModule) -> None:
        return None

    def call(self, gm: fx.GraphModule) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def ensures(self, gm: fx.GraphModule) -> None:
        return None

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        self.requires(gm)
        result = self.call(gm)
        if result.modified:
            cleanup(gm)
        self.ensures(gm)
        logger.info("%s: %d match(es), %s", self.name, result.matches, "modified" if result.modified else "unchanged")
        return result


def tag_node(node: fx.Node, source: fx.Node, pass_name: str) -> None:
    """Give a new node the metadata of the node it derives from, plus the pass tag."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "val", "tensor_meta"):
        if key in source.meta:
            node.meta[key] = source.meta[key]
    node.meta[PASS_TAG] = pass_name


def cleanup(gm: fx.GraphModule) -> None:
    """Dead-code elimination, lint, recompile (Torch-TensorRT's cleanup)."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def run_passes(gm: fx.GraphModule, passes: Sequence[GraphPass]) -> list[PassResult]:
    """Run ``passes`` in order on ``gm`` (in place); return their results."""
    return [p(gm) for p in passes]


def transform_pipeline(config) -> list[GraphPass]:
    """Capture → adapted graph: annotate targets (policy), insert adapters (mechanism)."""
    from .annotate_targets import AnnotateTargets
    from .insert_adapters import InsertAdapters

    return [AnnotateTargets(config.targets), InsertAdapters(config)]


def merge_pipeline() -> list[GraphPass]:
    """Trained graph → merged graph: fold scales, MALoRA's P and LoRA sites."""
    from .fold_adapters import FoldAdapters

    return [FoldAdapters()]


def lower_pipeline(fold_lora: bool = True) -> list[GraphPass]:
    """Trained or merged graph → static graph: fold (if not yet), then lower the routing.

    ``fold_lora=False`` keeps LoRA updates out of the base weights (switchable exports).
    """
    from .fold_adapters import FoldAdapters
    from .lower_routing import LowerRouting

    return [FoldAdapters(fold_lora), LowerRouting()]
