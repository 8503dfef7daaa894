"""Chained adapted linears (b(a(x)), l(l(x))) and a module called twice (m(x) + m(y)):
each adapter reads the adapted value of its input, and a LoRA update is folded once per module."""

import copy

import pytest
import torch
from conftest import randomize_adapters, small_config
from reference import hooked_reference
from torch import nn

import malora_fx as mf
from malora_fx.adapters.layers import LoRALayer


class Chained(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.a, self.b, self.l, self.m = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        h = self.b(self.a(x))  # b reads a's adapted output
        h = self.l(self.l(h))  # one module called on its own output
        return self.m(h) + self.m(torch.tanh(x))  # one module called on two inputs


def _expected(model, gm, cfg, x):
    tensors = {
        f: {k: v.detach().clone() for k, v in layer.file_tensors().items()}
        for f, layer in mf.adapter_layers(gm).items()
    }
    reference = copy.deepcopy(model)  # symbolic_trace shares the modules (and merge swaps their weights)
    with (
        torch.no_grad(),
        hooked_reference(
            reference, tensors, method=cfg.method, top_k=cfg.top_k, scale=cfg.scale, normalize=cfg.normalize_top_k
        ),
    ):
        return reference(x)


@pytest.mark.parametrize("tracer", ["export", "symbolic_trace"])
@pytest.mark.parametrize("method", ["lora", "malora", "hydralora"])
def test_chained_and_repeated_sites_match_the_eager_reference(method, tracer):
    torch.manual_seed(0)
    model = Chained().eval()
    x = torch.randn(2, 5, 16)
    cfg = small_config(method, targets="a,b,l,m", **({"shared_rank": 6} if method == "malora" else {}))
    gm = mf.transform(copy.deepcopy(model), cfg, example_args=(x,), tracer=tracer)
    randomize_adapters(gm, std=0.2, seed=3)
    mf.set_adapters_training(gm, False)
    expected = _expected(model, gm, cfg, x)
    with torch.no_grad():
        assert (expected - model(x)).abs().max() > 1e-2  # the adapters really change the output
        torch.testing.assert_close(gm(x), expected, atol=1e-5, rtol=1e-5)
        merged = mf.merge(gm)
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
        lowered = mf.lower(merged)
        torch.testing.assert_close(lowered(x), expected, atol=1e-5, rtol=1e-5)


def test_lora_of_a_module_called_twice_is_folded_once():
    torch.manual_seed(1)
    model = Chained().eval()
    x = torch.randn(2, 5, 16)
    cfg = small_config("lora", targets="m")
    gm = mf.transform(copy.deepcopy(model), cfg, example_args=(x,), tracer="export")
    randomize_adapters(gm, std=0.2, seed=4)
    mf.set_adapters_training(gm, False)
    (layer,) = mf.adapter_layers(gm).values()
    assert isinstance(layer, LoRALayer)
    update = (layer.B @ layer.A).detach() * layer.scale
    expected = _expected(model, gm, cfg, x)
    with torch.no_grad():
        merged = mf.merge(gm)
        weights = [t for name, t in merged.state_dict().items() if name.endswith("m.weight")]
        assert len(weights) == 1
        torch.testing.assert_close(weights[0], model.m.weight + update, atol=1e-6, rtol=0)  # W + sBA, not W + 2sBA
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
