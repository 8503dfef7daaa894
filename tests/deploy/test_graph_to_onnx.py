"""Direct translation of a captured graph to ONNX, checked against torch.onnx.export of the same run."""

import collections
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import randomize_adapters, small_config, tiny
from test_onnx_export import make_run

import malora_fx as mf
from malora_fx.deploy.graph_to_onnx import translate_graph
from malora_fx.deploy.onnx_export import export_run
from malora_fx.deploy.stage_clock import StageClock
from malora_fx.graph.cached_decoder import cache_geometry, capture_decoder, decoder_names

LOGGER = "malora_fx.deploy.graph_to_onnx"


def _ops(path) -> collections.Counter:
    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    return collections.Counter((n.domain, n.op_type) for n in model.graph.node)


def _initializer_names(path) -> set[str]:
    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    return {i.name for i in model.graph.initializer if not i.name.startswith("val_")}  # val_*: folded constants


def _decoder_feed(seed: int, batch: int = 2, seq: int = 5, past: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {
        "input_ids": rng.integers(0, 258, size=(batch, seq)),
        "attention_mask": np.ones((batch, past + seq), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(past, past + seq), (batch, seq)).copy(),
    }
    for i in range(2):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = rng.standard_normal((batch, 2, past, 16)).astype(np.float32)
    return feed


@pytest.mark.parametrize("method", ["malora", "molora", "hydralora", "lora", "base"])
def test_direct_translation_matches_torch_onnx_export(method, tmp_path):
    """Same nodes, same named weights, same outputs (1e-5) as torch.onnx.export's trace of the same run."""
    run = make_run(tmp_path / "run", "tiny-llama", "malora" if method == "base" else method)
    clocks = {}
    for direct in (True, False):
        clocks[direct] = StageClock()
        export_run(run, tmp_path / str(direct), base_only=method == "base", direct=direct, clock=clocks[direct])
    assert "translate" in clocks[True].seconds and "torch.onnx" not in clocks[True].seconds
    assert "torch.onnx" in clocks[False].seconds and "translate" not in clocks[False].seconds
    direct, traced = tmp_path / "True", tmp_path / "False"
    assert _ops(direct) == _ops(traced)
    assert _initializer_names(direct) == _initializer_names(traced)
    feed = _decoder_feed(seed=1)
    got = ort.InferenceSession(str(direct / "model.onnx")).run(None, feed)
    expected = ort.InferenceSession(str(traced / "model.onnx")).run(None, feed)
    assert len(got) == len(expected) == 5
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, float(np.abs(b).max()))


def _decoder_graph(method: str | None = "malora"):
    model, _ = tiny("tiny-llama")
    gm, example = capture_decoder(model)
    if method:
        gm = mf.transform(gm, small_config(method))
        randomize_adapters(gm, seed=2)
    names = decoder_names(cache_geometry(model.config)[0])
    return gm, example, names


def test_a_graph_with_adapter_modules_is_left_to_torch_onnx(caplog):
    gm, _, (inputs, outputs) = _decoder_graph("malora")  # not merged or lowered: adapters are submodule calls
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert translate_graph(gm, inputs, outputs) is None
    assert "a call of submodule" in caplog.text and "tracing with torch.onnx.export" in caplog.text


def test_declines_names_that_do_not_fit_the_graph(caplog):
    gm, _, (inputs, outputs) = _decoder_graph(None)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert translate_graph(gm, inputs[:-1], outputs) is None
        assert translate_graph(gm, inputs, outputs + ["extra"]) is None
    assert f"{len(inputs)} graph inputs for {len(inputs) - 1} names" in caplog.text
    assert f"the graph's outputs are not {len(outputs) + 1} flat values" in caplog.text


def test_declines_inputs_named_in_another_order(caplog):
    class Scale(torch.nn.Module):
        def forward(self, a, b):
            return a * 2 + b

    gm = mf.capture(Scale(), {"a": torch.randn(2, 3), "b": torch.randn(2, 3)})
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert translate_graph(gm, ["b", "a"], ["output_0"]) is None
    assert "inputs are named in another order" in caplog.text
    assert translate_graph(gm, ["a", "b"], ["output_0"]) is not None


def test_declines_an_in_place_op_and_leaves_the_graph_as_it_was(caplog):
    gm, _, (inputs, outputs) = _decoder_graph(None)
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.add.Tensor)
    node.target = torch.ops.aten.add_.Tensor
    before = [(n.name, n.target) for n in gm.graph.nodes]
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert translate_graph(gm, inputs, outputs) is None
    assert "in-place op aten.add_.Tensor" in caplog.text
    assert [(n.name, n.target) for n in gm.graph.nodes] == before


def test_translation_leaves_the_graph_it_was_given_unchanged():
    gm, example, (inputs, outputs) = _decoder_graph(None)
    before = [(n.name, n.op, n.target) for n in gm.graph.nodes]
    with torch.no_grad():
        expected = gm(**example)[0]
    assert translate_graph(gm, inputs, outputs) is not None
    assert [(n.name, n.op, n.target) for n in gm.graph.nodes] == before
    with torch.no_grad():
        assert torch.equal(gm(**example)[0], expected)


def test_mixed_dtypes_get_explicit_casts(tmp_path):
    """An op mixing int64 and float32 inputs (type promotion) translates with a Cast and the same values."""

    class Mixed(torch.nn.Module):
        def forward(self, x, counts):
            return x * counts + (counts > 1)

    x, counts = torch.randn(3, 4), torch.randint(0, 4, (3, 4))
    gm = mf.capture(Mixed(), {"x": x, "counts": counts})
    program = translate_graph(gm, ["x", "counts"], ["y"])
    assert program is not None
    program.save(str(tmp_path / "m.onnx"))
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert "Cast" in {n.op_type for n in model.graph.node}
    (y,) = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x.numpy(), "counts": counts.numpy()})
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, (x * counts + (counts > 1)).numpy(), rtol=1e-6)


def test_encoder_export_selects_the_named_field_and_matches_torch_onnx_export(tmp_path):
    """A BERT returns last_hidden_state and pooler_output; the export keeps the first, translated directly."""
    run = make_run(tmp_path / "run", "tiny-bert", "malora")
    clock = StageClock()
    direct = export_run(run, tmp_path / "direct", clock=clock)
    traced = export_run(run, tmp_path / "traced", direct=False)
    assert "translate" in clock.seconds and "torch.onnx" not in clock.seconds
    assert _ops(direct) == _ops(traced)
    session = ort.InferenceSession(str(direct / "model.onnx"))
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state"]
    rng = np.random.default_rng(3)
    feed = {i.name: rng.integers(0, 2 if "type" in i.name else 100, size=(2, 6)) for i in session.get_inputs()}
    feed["attention_mask"][1, 4:] = 0  # a padded row
    (got,) = session.run(None, feed)
    (expected,) = ort.InferenceSession(str(traced / "model.onnx")).run(None, feed)
    assert np.abs(got - expected).max() <= 1e-5 * max(1.0, float(np.abs(expected).max()))


def test_output_nodes_by_position_or_field():
    from malora_fx.deploy.graph_to_onnx import output_nodes

    model, kwargs = tiny("tiny-bert")
    gm = mf.capture(model, kwargs)
    flat = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert gm._out_spec.context == ["last_hidden_state", "pooler_output"]
    assert output_nodes(gm, ["pooler_output"]) == [flat[1]]
    assert output_nodes(gm, ["a", "b"]) == list(flat)  # as many names as outputs: in order
    assert output_nodes(gm, ["logits"]) is None


def test_a_failing_translation_falls_back_to_torch_onnx_export(tmp_path, monkeypatch, caplog):
    from malora_fx.deploy import graph_to_onnx

    def broken(*args, **kwargs):
        raise TypeError("an internal signature this torch does not have")

    monkeypatch.setattr(graph_to_onnx, "_lift", broken)
    run = make_run(tmp_path / "run", "tiny-llama", "hydralora")
    clock = StageClock()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = export_run(run, tmp_path / "exp", clock=clock)
    assert "direct ONNX translation failed (an internal signature this torch does not have)" in caplog.text
    assert "torch.onnx" in clock.seconds and "translate" in clock.seconds  # tried, then traced
    got = ort.InferenceSession(str(out / "model.onnx")).run(["logits"], _decoder_feed(seed=2))[0]
    assert np.isfinite(got).all() and got.shape == (2, 5, 258)
