"""capture: examples stored as views, size-1 examples, non-tensor keyword constants (issue 12, items 1-3)."""

import numpy as np
import pytest
import torch
from conftest import TINY_NAMES, main_output, randomize_adapters, small_config, tiny
from torch import nn

import malora_fx as mf
from malora_fx.errors import MaloraError
from malora_fx.graph.constants import baked_constants
from malora_fx.passes import EXAMPLE_KWARGS_KEY


def _inputs(name: str, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, : seq // 3] = 0  # left padding in the first row: the mask is used, not just carried
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if name == "tiny-bert":
        kwargs["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return kwargs


def _matches_eager(gm, model, kwargs) -> None:
    with torch.no_grad():
        got, expected = main_output(gm(**kwargs)), main_output(model(**kwargs))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_views_of_a_bigger_batch_capture_like_fresh_tensors(name):
    model, _ = tiny(name)
    big = _inputs(name, 4, 32)
    example = {k: v[:2, :16] for k, v in big.items()}  # non-contiguous views sharing the big batch's storage
    assert all(not v.is_contiguous() and v._base is not None for v in example.values())
    before = {k: v.clone() for k, v in big.items()}
    gm = mf.capture(model, example_kwargs=example)
    for batch, seq in [(3, 5), (4, 32), (1, 1)]:
        _matches_eager(gm, model, _inputs(name, batch, seq, seed=batch))
    _matches_eager(gm, model, example)  # the views themselves still go in
    assert all(torch.equal(big[k], before[k]) for k in big)  # the caller's tensors are untouched


@pytest.mark.parametrize(
    "name, batch, seq",
    [("tiny-llama", 1, 8), ("tiny-llama", 2, 1), ("tiny-llama", 1, 1), ("tiny-gpt2", 1, 1), ("tiny-bert", 1, 1)],
)
def test_size_one_examples_keep_batch_and_sequence_dynamic(name, batch, seq):
    model, _ = tiny(name)
    example = _inputs(name, batch, seq)
    gm = mf.capture(model, example_kwargs=example)
    assert all(v.shape == (batch, seq) for v in example.values())  # repeated copies were traced, not these
    _matches_eager(gm, model, _inputs(name, 2, 5, seed=1))
    _matches_eager(gm, model, _inputs(name, 3, 7, seed=2))
    _matches_eager(gm, model, example)


def test_size_one_example_of_a_transformed_graph_trains_at_other_sizes():
    model, _ = tiny("tiny-llama")
    example = _inputs("tiny-llama", 1, 1)
    gm = mf.transform(model, small_config("malora"), example_kwargs=example)
    randomize_adapters(gm, seed=5)
    other = _inputs("tiny-llama", 2, 5, seed=3)
    logits = gm(**other).logits
    assert logits.shape == (2, 5, model.config.vocab_size)
    logits.square().mean().backward()
    assert all(p.grad is not None for p in mf.trainable_parameters(gm))


class _Scaled(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(features, 3)

    def forward(self, x, double=False, offset=None):
        y = self.proj(x)
        if double:
            y = y * 2
        if offset is not None:
            y = y + offset
        return y


@pytest.mark.parametrize("tracer", ["export", "symbolic_trace"])
def test_plain_module_constants_are_baked_in(tracer):
    torch.manual_seed(0)
    module = _Scaled(4).eval()
    x = torch.randn(1, 4)  # batch 1: must not be fixed either
    gm = mf.capture(module, example_kwargs={"x": x, "double": True, "offset": 0.5}, tracer=tracer)
    assert gm.meta[EXAMPLE_KWARGS_KEY] == ["x"]
    assert baked_constants(gm) == {"double": True, "offset": 0.5}
    other = torch.randn(5, 4)
    expected = module(other, double=True, offset=0.5)
    torch.testing.assert_close(gm(x=other), expected)
    torch.testing.assert_close(gm(x=other, double=True, offset=0.5), expected)
    with pytest.raises(MaloraError, match=r"^double=False: this graph was captured with double=True") as err:
        gm(x=other, double=False)
    assert "\n" not in str(err.value)


def test_plain_module_feature_width_one_stays_fixed():
    module = _Scaled(1).eval()
    gm = mf.capture(module, example_kwargs={"x": torch.randn(4, 1)}, tracer="export")
    other = torch.randn(6, 1)
    torch.testing.assert_close(gm(x=other), module(other))


def test_use_cache_false_goes_through_transform_merge_lower_and_onnx(tmp_path):
    import onnxruntime as ort

    model, _ = tiny("tiny-llama")
    tensors = _inputs("tiny-llama", 2, 8)
    example = {**tensors, "use_cache": False, "return_dict": True}  # as HF users write it
    gm = mf.transform(model, small_config("malora"), example_kwargs=example)
    randomize_adapters(gm, seed=7)
    assert gm.meta[EXAMPLE_KWARGS_KEY] == ["input_ids", "attention_mask"]
    other = _inputs("tiny-llama", 3, 5, seed=4)
    with torch.no_grad():
        expected = gm(**other).logits
        assert torch.equal(gm(**other, use_cache=False, return_dict=True).logits, expected)
        assert torch.equal(gm(**example).logits, gm(**tensors).logits)  # the captured example calls it as is
        assert (expected - model(**other).logits).abs().max() > 1e-3  # the adapters do something
    with pytest.raises(MaloraError, match=r"^use_cache=True: .*captured with use_cache=False"):
        gm(**other, use_cache=True)

    with torch.no_grad():
        lowered = mf.lower(mf.merge(gm), inplace=True, fuse=True)
        torch.testing.assert_close(lowered(**other, use_cache=False).logits, expected, atol=1e-5, rtol=1e-5)
    out = mf.export_onnx(gm, tmp_path / "onnx", example)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    (logits,) = session.run(["logits"], {k: v.numpy() for k, v in other.items()})
    real = other["attention_mask"].bool().numpy()  # a fully masked (padding) query row is implementation-defined
    assert np.abs(logits - expected.numpy())[real].max() <= 1e-4

    with pytest.raises(MaloraError, match=r'^example_kwargs\["output_attentions"\]: a bool is not a graph input'):
        mf.export_onnx(gm, tmp_path / "bad", {**tensors, "output_attentions": False})
    assert not (tmp_path / "bad").exists()
