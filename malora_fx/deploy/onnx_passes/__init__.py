"""ONNX-level passes run on every export after ``torch.onnx.export`` (onnx-ir models, in place).

:data:`EXPORT_PASSES` is the ordered list a reader sees in one place; :func:`optimize_onnx`
runs it and returns one :class:`PassReport` per pass (name, changed, nodes after, seconds).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir

from .cleanup import cleanup
from .gqa_attention import fuse_group_query_attention
from .group_routing import group_routed_sites
from .mha_attention import fuse_multi_head_attention
from .moe_routing import fuse_moe_routing
from .ort_fusions import fuse_for_ort
from .rotary_embedding import MAX_POSITIONS_KEY, fuse_rotary_embedding

__all__ = ["EXPORT_PASSES", "MAX_POSITIONS_KEY", "OPT_IN_PASSES", "PassReport", "count_nodes", "optimize_onnx"]

logger = logging.getLogger(__name__)

# (name, pass, emits onnxruntime contrib ops)
EXPORT_PASSES: list[tuple[str, Callable[[ir.Model], ir.passes.PassResult], bool]] = [
    ("cleanup", cleanup, False),
    ("rotary_embedding", fuse_rotary_embedding, True),
    ("gqa_attention", fuse_group_query_attention, True),
    ("mha_attention", fuse_multi_head_attention, True),
    ("ort_fusions", fuse_for_ort, True),
    ("moe_routing", fuse_moe_routing, True),
    ("group_routing", group_routed_sites, False),
]
# Passes that run only when asked for (``optimize_onnx(moe_kernel=True)``): measured slower on CPU.
OPT_IN_PASSES = {"moe_routing": "moe_kernel"}


@dataclass(frozen=True)
class PassReport:
    """What one ONNX pass did."""

    name: str
    modified: bool
    nodes: int
    seconds: float


def optimize_onnx(model: ir.Model, *, ort_fusions: bool = True, moe_kernel: bool = False) -> list[PassReport]:
    """Run :data:`EXPORT_PASSES` on ``model`` in place, in order (contrib-op passes only with ``ort_fusions``;
    ``moe_routing`` only with ``moe_kernel`` as well)."""
    reports = []
    chosen = {"moe_kernel": moe_kernel}
    for name, run, contrib in EXPORT_PASSES:
        if (contrib and not ort_fusions) or (name in OPT_IN_PASSES and not chosen[OPT_IN_PASSES[name]]):
            continue
        began = time.perf_counter()
        result = run(model)
        report = PassReport(name, bool(result.modified), count_nodes(model), time.perf_counter() - began)
        logger.info(
            "onnx pass %s: %s, %d nodes, %.1f s",
            name,
            "changed" if report.modified else "no change",
            report.nodes,
            report.seconds,
        )
        reports.append(report)
    return reports


def count_nodes(model: ir.Model) -> int:
    """Nodes of the main graph (subgraphs not counted)."""
    return sum(1 for _ in model.graph)
