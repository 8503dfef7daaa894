"""The RotaryEmbedding fusion on hand-written graphs: values against the plain graph, and what it leaves alone.

(Whole decoders, fused with GroupQueryAttention, are checked against PyTorch in test_gqa_attention.py.)
"""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper

from malora_fx.deploy.onnx_passes.rotary_embedding import MAX_POSITIONS_KEY, fuse_rotary_embedding

F, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
HEAD = 8


def _rotary_graph(*, cos_reads_mask: bool = False, interleaved_halves: bool = False) -> onnx.ModelProto:
    """``x·cos + rotate_half(x)·sin`` as torch.onnx writes it, cos/sin from ``position_ids`` (Llama's form).

    ``cos_reads_mask``: cos also depends on another input (not a table of the position).
    ``interleaved_halves``: rotate_half concatenates the halves the other way round (not rotary).
    """
    half = HEAD // 2
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, HEAD, 2, dtype=np.float32) / HEAD))
    inits = [
        helper.make_tensor("inv_freq", F, [half, 1], inv_freq.reshape(half, 1)),
        helper.make_tensor("ax1", I64, [1], [1]),
        helper.make_tensor("zero", I64, [1], [0]),
        helper.make_tensor("half", I64, [1], [half]),
        helper.make_tensor("big", I64, [1], [2**62]),
        helper.make_tensor("last", I64, [1], [3]),
        helper.make_tensor("one", I64, [1], [1]),
    ]
    n = helper.make_node
    nodes = [
        n("Cast", ["position_ids"], ["pos_f"], to=F),  # [b, s]
        n("Unsqueeze", ["pos_f", "ax1"], ["pos3"]),  # [b, 1, s]
        n("MatMul", ["inv_freq", "pos3"], ["freqs_t"]),  # [b, h/2, s]
        n("Transpose", ["freqs_t"], ["freqs"], perm=[0, 2, 1]),  # [b, s, h/2]
        n("Concat", ["freqs", "freqs"], ["emb"], axis=-1),
        n("Cos", ["emb"], ["cos3"]),
        n("Sin", ["emb"], ["sin3"]),
        n("Unsqueeze", ["cos3", "ax1"], ["cos"]),  # [b, 1, s, h]
        n("Unsqueeze", ["sin3", "ax1"], ["sin"]),
        n("Mul", ["x", "cos_used"], ["x_cos"]),
        n("Slice", ["x", "zero", "half", "last", "one"], ["x1"]),
        n("Slice", ["x", "half", "big", "last", "one"], ["x2"]),
        n("Neg", ["x2"], ["neg"]),
        n("Concat", ["x1", "neg"] if interleaved_halves else ["neg", "x1"], ["rot"], axis=-1),
        n("Mul", ["rot", "sin"], ["rot_sin"]),
        n("Add", ["x_cos", "rot_sin"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", F, ["b", 2, "s", HEAD])]
    inputs.append(helper.make_tensor_value_info("position_ids", I64, ["b", "s"]))
    if cos_reads_mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", F, ["b", 1, "s", 1]))
        nodes.insert(8, n("Mul", ["cos", "attention_mask"], ["cos_used"]))
    else:
        nodes.insert(8, n("Identity", ["cos"], ["cos_used"]))
    graph = helper.make_graph(
        nodes, "rotary", inputs, [helper.make_tensor_value_info("y", F, ["b", 2, "s", HEAD])], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _model(proto: onnx.ModelProto, max_positions: int | None = 64) -> ir.Model:
    model = ir.serde.deserialize_model(proto)
    if max_positions:
        model.meta[MAX_POSITIONS_KEY] = max_positions
    return model


def _run(proto: onnx.ModelProto, feeds) -> np.ndarray:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_rotary_becomes_one_node_with_the_same_values():
    proto = _rotary_graph()
    model = _model(proto)
    assert fuse_rotary_embedding(model).modified and model.meta["rotary_embedding"] == 1
    assert [(n.domain, n.op_type) for n in model.graph] == [("com.microsoft", "RotaryEmbedding")]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 5, HEAD)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]], np.int64)  # the second row left-padded
    feeds = {"x": x, "position_ids": positions}
    fused = ir.serde.serialize_model(model)
    np.testing.assert_allclose(_run(fused, feeds), _run(proto, feeds), rtol=1e-5, atol=1e-6)
    caches = [np.asarray(v.const_value.numpy()) for v in model.graph.initializers.values()]
    assert sorted(c.shape for c in caches) == [(64, HEAD // 2), (64, HEAD // 2)]


def test_rotary_is_left_alone_without_a_table_of_the_position():
    for proto, max_positions in [
        (_rotary_graph(), None),  # the export did not say how long the cache must be
        (_rotary_graph(cos_reads_mask=True), 64),  # cos depends on another input
        (_rotary_graph(interleaved_halves=True), 64),  # not rotate_half
    ]:
        model = _model(proto, max_positions)
        assert not fuse_rotary_embedding(model).modified and model.meta["rotary_embedding"] == 0
        assert "RotaryEmbedding" not in {n.op_type for n in model.graph}
