"""merge, lower and export_onnx leave the caller's GraphModule as it was unless inplace=True (issue 12, item 7)."""

import pytest
import torch
from conftest import randomize_adapters, small_config, tiny

import malora_fx as mf
from malora_fx.adapters.folded import FoldedMixture
from malora_fx.adapters.layers import AdapterLayer
from malora_fx.passes import LOWERED_ATTR


def _adapted(method: str, seed: int = 11):
    model, kwargs = tiny("tiny-llama")
    gm = mf.transform(model, small_config(method, targets="q_proj,v_proj,down_proj"), kwargs)
    randomize_adapters(gm, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (3, 6), generator=gen)
    other = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return model, gm, kwargs, other


def _snapshot(gm, other):
    with torch.no_grad():
        logits = gm(**other).logits
    return {
        "logits": logits,
        "modules": [(name, type(m)) for name, m in gm.named_modules()],
        "adapters": dict(mf.adapter_layers(gm)),
        "trainable": [(p, p.detach().clone(), p.requires_grad) for p in mf.trainable_parameters(gm)],
        "state": {k: v.detach().clone() for k, v in gm.state_dict().items()},
        "code": gm.code,
    }


def _assert_unchanged(gm, other, before) -> None:
    assert gm.code == before["code"]
    assert [(name, type(m)) for name, m in gm.named_modules()] == before["modules"]
    assert dict(mf.adapter_layers(gm)) == before["adapters"] and before["adapters"]
    now = mf.trainable_parameters(gm)
    assert len(now) == len(before["trainable"])
    for param, (old, value, grad) in zip(now, before["trainable"], strict=True):
        assert param is old and param.requires_grad == grad and torch.equal(param, value)
    state = gm.state_dict()
    assert state.keys() == before["state"].keys()
    assert all(torch.equal(state[k], v) for k, v in before["state"].items())  # base weights too (LoRA folds into W)
    with torch.no_grad():
        assert torch.equal(gm(**other).logits, before["logits"])
    gm(**other).logits.square().mean().backward()  # still trainable
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in now)


def _has_adapter_modules(gm) -> bool:
    return any(isinstance(m, (AdapterLayer, FoldedMixture)) for m in gm.modules())


@pytest.mark.parametrize("method", ["malora", "lora"])
def test_merge_and_lower_copy_by_default(method):
    _, gm, _, other = _adapted(method)
    before = _snapshot(gm, other)
    merged = mf.merge(gm)
    lowered = mf.lower(gm, fuse=True)
    assert merged is not gm and lowered is not gm
    assert not mf.adapter_layers(merged) and not mf.adapter_layers(lowered)
    assert not _has_adapter_modules(lowered) and hasattr(lowered, LOWERED_ATTR) == (method != "lora")
    with torch.no_grad():
        torch.testing.assert_close(merged(**other).logits, before["logits"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lowered(**other).logits, before["logits"], atol=1e-5, rtol=1e-5)
    _assert_unchanged(gm, other, before)
    # the frozen base weights are shared with the copy, not duplicated
    name = "model.embed_tokens.weight"
    assert lowered.get_parameter(name) is gm.get_parameter(name)


def test_inplace_rewrites_the_given_graph():
    _, gm, _, other = _adapted("molora")
    with torch.no_grad():
        before = gm(**other).logits
    assert mf.merge(gm, inplace=True) is gm and not mf.adapter_layers(gm)
    assert mf.lower(gm, inplace=True) is gm and not _has_adapter_modules(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(**other).logits, before, atol=1e-5, rtol=1e-5)


def test_copy_keeps_input_checks_and_baked_constants():
    model, _ = tiny("tiny-llama")
    ids = torch.randint(0, 250, (2, 8))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    gm = mf.transform(model, small_config("hydralora"), example)
    randomize_adapters(gm, seed=2)
    lowered = mf.lower(gm)
    with torch.no_grad():
        torch.testing.assert_close(lowered(**example).logits, gm(**example).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(mf.MaloraError, match="use_cache=True"):
        lowered(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    with pytest.raises(ValueError, match="keyword mismatch"):  # torch.export's own input check survives the copy
        lowered(input_ids=ids)


def test_export_onnx_leaves_the_graph_trainable(tmp_path):
    _, gm, kwargs, other = _adapted("malora", seed=5)
    mf.set_adapters_training(gm, True)
    before = _snapshot(gm, other)
    mf.export_onnx(gm, tmp_path / "onnx", kwargs)
    assert (tmp_path / "onnx" / "model.onnx").is_file()
    assert all(layer.training for layer in mf.adapter_layers(gm).values())  # the export's eval flags stay on the copy
    _assert_unchanged(gm, other, before)
