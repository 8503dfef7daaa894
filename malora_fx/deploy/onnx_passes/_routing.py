"""Matching the gating chain ``lower_routing`` writes for a routed site, shared by the ONNX passes
that rewrite it (``moe_routing``, ``group_routing``)::

    probs = Softmax(logits);  v, i = TopK(probs, k)        # (v / ReduceSum(v) when normalised)
    g     = ScatterElements(probs * 0, i, v)
    a     = h * (g @ spread)
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._values import const_array, producer_of


def _is_zero_scalar(value: ir.Value | None) -> bool:
    array = const_array(value)
    return array is not None and array.size == 1 and float(array.reshape(())) == 0.0


def top_k_gates(spread_in: ir.Value | None) -> tuple[ir.Value, int, bool] | None:
    """``(logits, k, normalised)`` when ``spread_in`` is the top-k gates of ``Softmax(logits)``."""
    scatter = producer_of(spread_in, "ScatterElements")
    if scatter is None or len(scatter.inputs) != 3:
        return None
    axis = scatter.attributes.get("axis")
    reduction = scatter.attributes.get("reduction")
    if axis is None or axis.value != -1 or (reduction is not None and reduction.value != "none"):
        return None
    zeros, indices, updates = scatter.inputs
    if zeros is None or indices is None or updates is None:
        return None
    mul = producer_of(zeros, "Mul")
    topk = indices.producer() if indices is not None else None
    if mul is None or topk is None or topk.op_type != "TopK" or topk.domain != "" or indices is not topk.outputs[1]:
        return None
    normalize = False
    if updates is not topk.outputs[0]:
        div = producer_of(updates, "Div")
        total = producer_of(div.inputs[1], "ReduceSum") if div is not None else None
        if (
            div is None
            or total is None
            or div.inputs[0] is not topk.outputs[0]
            or total.inputs[0] is not topk.outputs[0]
        ):
            return None
        normalize = True
    probs = topk.inputs[0]
    softmax = producer_of(probs, "Softmax")
    if softmax is None or softmax.inputs[0] is None:
        return None
    k = const_array(topk.inputs[1])
    largest = topk.attributes.get("largest")
    topk_axis = topk.attributes.get("axis")
    if softmax is None or k is None or (largest is not None and largest.value != 1):
        return None
    if (topk_axis is not None and topk_axis.value != -1) or softmax.attributes.get("axis") is None:
        return None
    if softmax.attributes["axis"].value != -1:
        return None
    others = [v for v in mul.inputs if v is not probs]
    if len(others) != 1 or len(mul.inputs) != 2 or not _is_zero_scalar(others[0]):  # probs * 0: zeros like probs
        return None
    return softmax.inputs[0], int(k.reshape(-1)[0]), normalize


def spread_shape(array: np.ndarray | None) -> tuple[int, int] | None:
    """``(N, r)`` when ``array`` is the ``[N, N·r]`` 0/1 map that repeats each expert's gate over its r
    columns, else None."""
    if array is None or array.ndim != 2 or array.shape[0] == 0 or array.shape[1] % array.shape[0]:
        return None
    experts, rank = array.shape[0], array.shape[1] // array.shape[0]
    return (experts, rank) if np.array_equal(array, np.kron(np.eye(experts), np.ones((1, rank)))) else None
