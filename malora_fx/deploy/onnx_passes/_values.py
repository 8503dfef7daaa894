"""Small onnx-ir helpers shared by the ONNX passes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

DOMAIN = "com.microsoft"  # onnxruntime's contrib ops


def producer_of(value: ir.Value | None, op_type: str) -> ir.Node | None:
    """The default-domain node of type ``op_type`` that produces ``value``, else None."""
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Send every use of ``old`` to ``new``, which takes its type and shape; a graph output keeps its name."""
    name = old.name
    new.type, new.shape = old.type, old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if new.is_graph_output():
        old.name = None
        new.name = name


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer or ``Constant`` output, else None."""
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        node = producer_of(value, "Constant")
        attr = node.attributes.get("value") if node is not None else None
        tensor = attr.value if attr is not None else None
    return None if tensor is None else tensor.numpy()
