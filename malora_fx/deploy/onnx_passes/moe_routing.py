"""moe_routing — run each lowered routed adapter as one ``com.microsoft.MoE`` node.

The lowering (``lower_routing``, then ``fuse_projections``) writes a routed site as about nine
plain nodes, all N experts computed densely::

    logits = Split(x @ W_fused)[j]                       # the router (or x @ W_g)
    probs  = Softmax(logits);  v, i = TopK(probs, k)      # (v / ReduceSum(v) when normalised)
    g      = ScatterElements(probs * 0, i, v)
    h      = z @ E_cat   or   z                           # z = Split(x @ W_fused)[l] (or x @ D)
    y      = (h * (g @ spread)) @ U_cat;   out = base + y

onnxruntime's MoE kernel computes ``Σ_{e ∈ top-k} p_e · fc2_e · act(fc1_e · x)`` from the router
logits (softmax and top-k inside, ``normalize_routing_weights`` for the normalised form), and only
for the k chosen experts: at decode it reads k of the N experts' weights instead of all of them.
With ``activation_type="identity"``, ``fc1_e = (M_e)ᵀ`` (``M`` the linear map from ``x`` to ``h``,
composed from the constants above, its expert-``e`` columns) and ``fc2_e = (U_e)ᵀ`` give the same
``y``. The kernel maps a width back to itself, so when the site's input and output widths differ
the narrower side is padded with zero rows (the input by ``Pad``, the output cut by ``Slice``).

Matched only when every piece is a constant of the expected form: ``spread`` exactly the 0/1
block map, ``Mul`` by a zero scalar, TopK on the last axis, the router reading the same ``x`` as
the adapter. float32 graphs only (the CPU kernel's type), and only when the installed onnxruntime
has a MoE kernel (:func:`onnxruntime_lacks_moe`). The columns of ``W_fused`` that fed ``h`` become
unused; they stay in that GEMM (a few percent of its columns).

Opt-in (``export --moe-kernel``, :data:`~malora_fx.deploy.onnx_passes.OPT_IN_PASSES`): on SmolLM2 with
2 CPU cores the MoE graph measured 1.80x prefill and 1.51x decode of onnxruntime-genai's base graph,
against 1.42x and 1.13x for the dense form (``tools/bench_serving.py --moe``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from ._attention import NodeBuilder, only_consumer
from ._routing import spread_shape, top_k_gates
from ._values import DOMAIN, const_array, producer_of, replace_value

__all__ = ["MoESite", "fuse_moe_routing", "match_site", "onnxruntime_lacks_moe"]

logger = logging.getLogger(__name__)


@dataclass
class MoESite:
    """One matched routed site: ``output = input @ M`` gated per expert, then ``@ U``."""

    anchor: ir.Node  # the final MatMul (h * gates) @ U_cat
    x: ir.Value  # the site's input [..., in]
    logits: ir.Value  # router logits [..., N]
    down: np.ndarray  # M: [in, N·r], x -> h
    up: np.ndarray  # U_cat: [N·r, out]
    num_experts: int
    top_k: int
    normalize: bool


def _linear_from(value: ir.Value | None) -> tuple[ir.Value, np.ndarray] | None:
    """``(x, W)`` with ``value = x @ W``, W constant: a ``MatMul`` by a constant, or one output of a
    last-axis ``Split`` of such a ``MatMul`` (its columns of W); else None."""
    split = producer_of(value, "Split")
    if split is not None and value is not None and split.inputs[0] is not None:
        axis = split.attributes.get("axis")
        sizes = const_array(split.inputs[1]) if len(split.inputs) > 1 else None
        inner = _linear_from(split.inputs[0])
        last = {-1} | ({split.inputs[0].shape.rank() - 1} if split.inputs[0].shape is not None else set())
        if inner is None or sizes is None or axis is None or axis.value not in last:
            return None
        index = list(split.outputs).index(value)
        start = int(np.sum(sizes[:index]))
        return inner[0], inner[1][:, start : start + int(sizes[index])]
    matmul = producer_of(value, "MatMul")
    weight = const_array(matmul.inputs[1]) if matmul is not None else None
    if matmul is None or weight is None or weight.ndim != 2 or matmul.inputs[0] is None:
        return None
    return matmul.inputs[0], weight


def _down_map(h: ir.Value | None) -> tuple[ir.Value, np.ndarray] | None:
    """``(x, M)`` with ``h = x @ M``: ``h`` is ``x @ W`` (a Split output of it, or a MatMul), or
    ``z @ E`` with ``z`` such a value (the shared down-projection, then the per-expert one)."""
    outer = producer_of(h, "MatMul")
    second = const_array(outer.inputs[1]) if outer is not None else None
    if outer is not None and second is not None:
        inner = _linear_from(outer.inputs[0])
        if inner is not None:
            return inner[0], inner[1].astype(np.float64) @ second.astype(np.float64)
    return _linear_from(h)


def match_site(anchor: ir.Node) -> MoESite | None:
    """The routed site whose last node is ``anchor`` (``MatMul(h * (g @ spread), U_cat)``), else None."""
    if anchor.op_type != "MatMul" or anchor.domain != "":
        return None
    up = const_array(anchor.inputs[1])
    mul = producer_of(anchor.inputs[0], "Mul")
    if up is None or up.ndim != 2 or mul is None or only_consumer(mul.outputs[0], "MatMul") is not anchor:
        return None
    for h, spread_out in (mul.inputs, reversed(mul.inputs)):
        spread_mm = producer_of(spread_out, "MatMul")
        spread = const_array(spread_mm.inputs[1]) if spread_mm is not None else None
        gates = top_k_gates(spread_mm.inputs[0]) if spread_mm is not None else None
        down = _down_map(h)
        if gates is None or down is None or spread is None:
            continue
        logits, k, normalize = gates
        shape = spread_shape(spread)
        router = _linear_from(logits)
        if shape is None or not down[1].shape[1] == up.shape[0] == spread.shape[1]:
            continue
        num_experts = shape[0]
        if router is None or router[0] is not down[0] or not 1 <= k <= num_experts:
            continue
        return MoESite(anchor, down[0], logits, down[1], up, num_experts, k, normalize)
    return None


def onnxruntime_lacks_moe() -> str | None:
    """Why the installed onnxruntime cannot run the MoE node this pass writes, or None when it can."""
    try:
        import onnxruntime
    except ImportError:
        return None  # exporting for another machine: write the node
    try:
        schemas = onnxruntime.capi.onnxruntime_pybind11_state.get_all_operator_schema()
    except AttributeError:
        return None
    if any(schema.name == "MoE" and schema.domain == DOMAIN for schema in schemas):
        return None
    return f"onnxruntime {onnxruntime.__version__} has no com.microsoft MoE kernel"


def _expert_weights(site: MoESite, width: int) -> tuple[np.ndarray, np.ndarray]:
    """fc1 ``[N, r, width]`` and fc2 ``[N, width, r]``, zero-padded to ``width``."""
    n = site.num_experts
    rank = site.up.shape[0] // n
    fc1 = np.zeros((n, rank, width), np.float32)
    fc2 = np.zeros((n, width, rank), np.float32)
    for e in range(n):
        cols = slice(e * rank, (e + 1) * rank)
        fc1[e, :, : site.down.shape[0]] = site.down[:, cols].T
        fc2[e, : site.up.shape[1], :] = site.up[cols, :].T
    return fc1, fc2


def _replace(graph: ir.Graph, site: MoESite, index: int) -> None:
    builder = NodeBuilder(graph, f"moe{index}")
    width_in, width_out = site.down.shape[0], site.up.shape[1]
    width = max(width_in, width_out)
    fc1, fc2 = _expert_weights(site, width)
    nodes: list[ir.Node] = []
    x = site.x
    rank = x.shape.rank() if x.shape is not None else 3
    if width_in < width:
        pads = np.zeros(2 * rank, np.int64)
        pads[-1] = width - width_in
        nodes.append(builder.node("Pad", [x, builder.const(pads, "pads")]))
        x = nodes[-1].outputs[0]
    flat = builder.node("Reshape", [site.logits, builder.const(np.array([-1, site.num_experts], np.int64), "shape")])
    attributes = {
        "k": site.top_k,
        "activation_type": "identity",
        "normalize_routing_weights": int(site.normalize),
    }
    moe = builder.node(
        "MoE",
        [x, flat.outputs[0], builder.const(fc1, "fc1"), None, builder.const(fc2, "fc2")],
        attributes,
        domain=DOMAIN,
    )
    nodes += [flat, moe]
    out = moe.outputs[0]
    if width_out < width:
        starts, ends = np.array([0], np.int64), np.array([width_out], np.int64)
        axes = np.array([-1], np.int64)
        cut = builder.node(
            "Slice", [out, builder.const(starts, "starts"), builder.const(ends, "ends"), builder.const(axes, "axes")]
        )
        nodes.append(cut)
        out = cut.outputs[0]
    graph.insert_before(site.anchor, nodes)
    replace_value(site.anchor.outputs[0], out)


def fuse_moe_routing(model: ir.Model) -> ir.passes.PassResult:
    """Replace every matched routed site of ``model`` by a MoE node (in place); ``model.meta["moe_routing"]``
    counts them."""
    graph = model.graph
    model.meta["moe_routing"] = 0
    sites = [s for s in (match_site(n) for n in graph if n.op_type == "MatMul") if s is not None]
    if not sites:
        return ir.passes.PassResult(model, False)
    if any(s.x.dtype != ir.DataType.FLOAT for s in sites):
        logger.info("moe routing: left plain (not float32)")
        return ir.passes.PassResult(model, False)
    lacking = onnxruntime_lacks_moe()
    if lacking:
        logger.warning("moe routing: %s; routed adapters left as plain ops", lacking)
        return ir.passes.PassResult(model, False)
    for index, site in enumerate(sites):
        _replace(graph, site, index)
    model.opset_imports.setdefault(DOMAIN, 1)
    common_passes.RemoveUnusedNodesPass()(model)
    model.meta["moe_routing"] = len(sites)
    logger.info("moe routing: %d sites", len(sites))
    return ir.passes.PassResult(model, True)
