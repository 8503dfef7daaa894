"""ONNX passes after torch.onnx.export: the clean-up pipeline, the pass list, the stage clock."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from malora_fx.deploy.onnx_passes import EXPORT_PASSES, OPT_IN_PASSES, count_nodes, optimize_onnx
from malora_fx.deploy.onnx_passes.cleanup import cleanup
from malora_fx.deploy.onnx_passes.ort_fusions import fuse_for_ort, register_checker_schemas
from malora_fx.deploy.stage_clock import StageClock


def _model(nodes, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=list(inits),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _messy() -> onnx.ModelProto:
    """y = (x * (a + b)) + (x * (a + b)) through an Identity, with a dead branch and a constant shape chain."""
    a = numpy_helper.from_array(np.arange(4, dtype=np.float32), "a")
    b = numpy_helper.from_array(np.full(4, 0.5, np.float32), "b")
    return _model(
        [
            helper.make_node("Add", ["a", "b"], ["ab"]),  # constant: folded
            helper.make_node("Mul", ["x", "ab"], ["m1"]),
            helper.make_node("Mul", ["x", "ab"], ["m2"]),  # same as m1: merged
            helper.make_node("Add", ["m1", "m2"], ["s"]),
            helper.make_node("Identity", ["s"], ["y"]),  # graph output through Identity
            helper.make_node("Neg", ["x"], ["dead"]),  # nobody reads it: removed
        ],
        [a, b],
    )


def test_cleanup_folds_merges_and_prunes_and_keeps_values():
    proto = _messy()
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    expected = 2 * x * (np.arange(4, dtype=np.float32) + 0.5)  # independent of any ONNX runtime
    model = ir.serde.deserialize_model(proto)
    assert cleanup(model).modified
    ops = [n.op_type for n in model.graph]
    assert ops.count("Mul") == 1 and "Neg" not in ops and "Identity" not in ops and ops.count("Add") == 1
    cleaned = ir.serde.serialize_model(model)
    onnx.checker.check_model(cleaned, full_check=True)
    np.testing.assert_allclose(_run(cleaned, x), expected, rtol=1e-6)
    np.testing.assert_allclose(_run(proto, x), expected, rtol=1e-6)


def test_cleanup_leaves_a_clean_graph_alone():
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    proto = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [w])
    model = ir.serde.deserialize_model(proto)
    cleanup(model)
    assert [n.op_type for n in model.graph] == ["MatMul"]
    assert [v.name for v in model.graph.outputs] == ["y"] and list(model.graph.initializers) == ["w"]


def test_optimize_onnx_reports_each_pass_in_order():
    model = ir.serde.deserialize_model(_messy())
    before = count_nodes(model)
    reports = optimize_onnx(model)
    assert [r.name for r in reports] == [name for name, _, _ in EXPORT_PASSES if name not in OPT_IN_PASSES]
    assert [r.name for r in optimize_onnx(ir.serde.deserialize_model(_messy()), ort_fusions=False)] == [
        name for name, _, contrib in EXPORT_PASSES if not contrib
    ]
    every = optimize_onnx(ir.serde.deserialize_model(_messy()), moe_kernel=True)
    assert [r.name for r in every] == [name for name, _, _ in EXPORT_PASSES] and "moe_routing" in OPT_IN_PASSES
    assert reports[0].modified and reports[-1].nodes == count_nodes(model) < before
    assert all(r.seconds >= 0 for r in reports)


def test_stage_clock_says_each_stage_and_sums_them():
    said = []
    clock = StageClock(say=said.append, prefix="export: ")
    with clock("capture"):
        pass
    with clock("save"):
        pass
    with pytest.raises(ValueError), clock("broken"):
        raise ValueError("x")
    assert list(clock.seconds) == ["capture", "save"]  # a failed stage is not recorded
    assert [line.split(":")[1].strip() for line in said] == ["capture", "save"]
    assert clock.summary().startswith("capture ") and clock.summary().endswith(f"(total {clock.total():.1f} s)")


def _rms_norm_model(skip: bool) -> onnx.ModelProto:
    """RMSNorm as torch.onnx writes it (Pow, ReduceMean, Add eps, Sqrt, Reciprocal, Mul, Mul by the weight),
    after a residual Add when ``skip``; two outputs so the residual sum stays live, as in a decoder layer."""
    w = numpy_helper.from_array(np.linspace(0.5, 1.5, 4, dtype=np.float32), "w")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    eps = numpy_helper.from_array(np.array(1e-6, np.float32), "eps")
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    nodes = [helper.make_node("Add", ["x", "r"], ["h"])] if skip else [helper.make_node("Identity", ["x"], ["h"])]
    nodes += [
        helper.make_node("Pow", ["h", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1, noop_with_empty_axes=0),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Reciprocal", ["rms"], ["inv"]),
        helper.make_node("Mul", ["h", "inv"], ["normed"]),
        helper.make_node("Mul", ["w", "normed"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "rms",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", 4]) for n in ("x", "r")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", 4]) for n in ("y", "h")],
        initializer=[w, two, eps, axes],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize(
    "skip, fused_op", [(False, "SimplifiedLayerNormalization"), (True, "SkipSimplifiedLayerNormalization")]
)
def test_ort_fusions_map_rms_norm_to_onnxruntime_kernels(skip, fused_op):
    proto = _rms_norm_model(skip)
    model = ir.serde.deserialize_model(proto)
    cleanup(model)
    assert fuse_for_ort(model).modified
    ops = [n.op_type for n in model.graph]
    assert [op for op in ops if op != "Identity"] == [fused_op]  # Identity: h, a graph output, copied from x
    counts = model.meta["ort_fusions"]
    assert (counts["rms_normalization"], counts["skip_rms_normalization"]) == (1, int(skip))
    fused = ir.serde.serialize_model(model)
    register_checker_schemas()
    onnx.checker.check_model(fused, full_check=True)
    rng = np.random.default_rng(1)
    x, r = (rng.standard_normal((2, 3, 4)).astype(np.float32) for _ in range(2))
    h = x + r if skip else x
    expected = h / np.sqrt((h**2).mean(-1, keepdims=True) + 1e-6) * np.linspace(0.5, 1.5, 4, dtype=np.float32)
    session = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"])
    y, h_out = session.run(["y", "h"], {"x": x, "r": r})
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h_out, h, rtol=1e-6)


def test_ort_fusions_leave_other_graphs_alone():
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    model = ir.serde.deserialize_model(_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [w]))
    assert not fuse_for_ort(model).modified
    assert [n.op_type for n in model.graph] == ["MatMul"] and not any(model.meta["ort_fusions"].values())
