"""capture_decoder: the grouped-attention form used by exports (enable_gqa instead of repeat_kv)."""

import os

import pytest
import torch
from conftest import tiny

from malora_fx.graph.cached_decoder import capture_decoder, sdpa_without_repeat_kv

SWITCH = "TRANSFORMERS_SDPA_FORCE_GQA"


def _sdpa_calls(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]


def test_gqa_sdpa_capture_has_no_repeat_kv_and_the_same_outputs():
    model, _ = tiny("tiny-llama")
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped: repeat_kv matters
    default, example = capture_decoder(model)
    grouped, _ = capture_decoder(model, gqa_sdpa=True)
    assert [n.kwargs.get("enable_gqa", False) for n in _sdpa_calls(default)] == [False, False]
    assert [n.kwargs.get("enable_gqa", False) for n in _sdpa_calls(grouped)] == [True, True]
    expands = [len([n for n in g.graph.nodes if n.target is torch.ops.aten.expand.default]) for g in (default, grouped)]
    assert expands[1] == expands[0] - 4  # two repeat_kv (keys, values) per layer, 2 layers
    with torch.no_grad():
        a, b = default(**example), grouped(**example)
    torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-5)
    for (ka, va), (kb, vb) in zip(a[1], b[1], strict=True):
        assert torch.equal(ka, kb) and torch.equal(va, vb)


@pytest.mark.parametrize("before", [None, "0"])
def test_the_switch_is_restored(before, monkeypatch):
    if before is None:
        monkeypatch.delenv(SWITCH, raising=False)
    else:
        monkeypatch.setenv(SWITCH, before)
    with pytest.raises(RuntimeError), sdpa_without_repeat_kv():
        assert os.environ[SWITCH] == "1"
        raise RuntimeError("inside")
    assert os.environ.get(SWITCH) == before
    with sdpa_without_repeat_kv(False):
        assert os.environ.get(SWITCH) == before
