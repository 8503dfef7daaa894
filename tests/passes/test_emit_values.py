"""emit(): the fake values it records for new nodes (the direct ONNX translation reads them)."""

import torch
from conftest import tiny

import malora_fx as mf
from malora_fx.passes import _fake_value, attach_buffer, emit, fake_mode_of

aten = torch.ops.aten


def _symbolic_input():
    model, kwargs = tiny("tiny-llama")
    gm = mf.capture(model, kwargs)
    x = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.linear.default)
    return gm, x


def test_matmul_by_a_2d_weight_has_the_shape_and_dtype_of_the_full_op():
    gm, x = _symbolic_input()
    fake_mode = fake_mode_of(x)
    value = x.meta["val"]
    assert any(isinstance(d, torch.SymInt) for d in value.shape)  # batch and sequence are symbolic
    with fake_mode:
        weight = fake_mode.from_tensor(torch.randn(value.shape[-1], 5))
        quick = _fake_value(aten.matmul.default, [value, weight])
        full = aten.matmul.default(value, weight)
    assert quick.shape == full.shape and quick.dtype == full.dtype and quick.device == full.device
    with gm.graph.inserting_after(x):
        node = emit(
            gm.graph,
            aten.matmul.default,
            (x, attach_buffer(gm, "t", "w", torch.randn(value.shape[-1], 5), fake_mode)),
            x,
            "t",
            fake_mode,
        )
    assert node.meta["val"].shape == full.shape


def test_other_matmuls_run_the_op():
    gm, x = _symbolic_input()
    fake_mode = fake_mode_of(x)
    value = x.meta["val"]
    with fake_mode:
        batched = fake_mode.from_tensor(torch.randn(2, value.shape[-1], 3))
        out = _fake_value(aten.matmul.default, [value[:2], batched])
    assert out.shape == (2, value.shape[1], 3)
