"""Adapter layers: formulas, initialisation, router, load-balancing loss, export-safety."""

import pytest
import torch
from conftest import METHODS, randomize_adapters, small_config, tiny
from reference import reference_update

import malora_fx as mf
from malora_fx.adapters.accounting import site_parameters
from malora_fx.adapters.layers import (
    LAYER_CLASSES,
    make_layer,
    random_expert_bases,
    site_generator,
    weights_loaded_next,
)
from malora_fx.adapters.routing import load_balancing_loss, route
from malora_fx.adapters.run_dir import load_run


def _random_layer(method, n=24, m=20, normalize=False, **changes):
    cfg = small_config(method, normalize_top_k=normalize, **changes)
    layer = make_layer(n, m, cfg, "blk.proj")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return layer, cfg


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_layer_matches_token_by_token_reference(method, normalize):
    layer, cfg = _random_layer(method, normalize=normalize)
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(2))
    expected = reference_update(method, layer.file_tensors(), x, top_k=cfg.top_k, scale=cfg.scale, normalize=normalize)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_file_shapes_and_parameter_count(method):
    layer, cfg = _random_layer(method, n=24, m=20)
    shapes = {k: tuple(v.shape) for k, v in layer.file_tensors().items()}
    assert shapes == LAYER_CLASSES[method].file_shapes(24, 20, cfg)
    assert sum(p.numel() for p in layer.parameters()) == site_parameters(
        method, 24, 20, num_experts=cfg.num_experts, rank=cfg.rank, shared_rank=cfg.shared_rank
    )


@pytest.mark.parametrize("method", METHODS)
def test_update_is_zero_at_init_but_not_after_b_changes(method):
    cfg = small_config(method)
    layer = make_layer(24, 20, cfg, "blk.proj")
    x = torch.randn(4, 24)
    assert torch.count_nonzero(layer(x)) == 0
    with torch.no_grad():
        layer.B.fill_(0.1)
    assert torch.count_nonzero(layer(x)) > 0


def test_malora_init_reconstructs_first_expert_basis():
    cfg = small_config("malora", rank=6, shared_rank=10, beta=1.0)
    layer = make_layer(24, 20, cfg, "blk.proj")
    # the same generator stream the layer used: K_t are drawn first
    bases = random_expert_bases(24, cfg.num_experts, cfg.shared_rank, site_generator(cfg.seed, "blk.proj"))
    torch.testing.assert_close(layer.P[0] @ layer.S, bases[0][: cfg.rank], atol=1e-5, rtol=1e-5)
    # S_A has orthonormal rows when beta = 1
    torch.testing.assert_close(layer.S @ layer.S.T, torch.eye(10), atol=1e-5, rtol=0)


def test_layers_to_be_loaded_skip_the_svd_and_a_run_loads_exactly(tmp_path):
    cfg = small_config("malora")
    with weights_loaded_next():
        skipped = make_layer(24, 20, cfg, "blk.proj")
    assert torch.count_nonzero(skipped.S) == 0 and torch.count_nonzero(skipped.P) == 0
    assert torch.count_nonzero(make_layer(24, 20, cfg, "blk.proj").S) > 0  # outside, the SVD init again
    model, kwargs = tiny("tiny-llama")
    gm = mf.transform(model, cfg, kwargs)
    randomize_adapters(gm, seed=11)
    mf.save_adapters(gm, tmp_path / "run", base_model="tiny-llama")
    loaded, _ = load_run(str(tmp_path / "run"))
    saved = {name: p for name, p in gm.named_parameters() if p.requires_grad}
    got = {name: p for name, p in loaded.named_parameters() if p.requires_grad}
    assert sorted(got) == sorted(saved) and len(saved) == 4 * len(mf.adapter_layers(gm))  # S, P, B, router
    for name, value in got.items():
        assert torch.equal(value, saved[name]), name


def test_malora_beta_scales_shared_and_coefficients_inversely():
    one = make_layer(24, 20, small_config("malora", beta=1.0), "blk.proj")
    two = make_layer(24, 20, small_config("malora", beta=1.25), "blk.proj")
    norm = lambda t: torch.linalg.norm(t.detach()).item()  # noqa: E731
    assert norm(two.S) / norm(one.S) == pytest.approx(1.25, rel=1e-5)
    assert norm(two.P) / norm(one.P) == pytest.approx(1 / 1.25, rel=1e-5)
    torch.testing.assert_close(two.P @ two.S, one.P @ one.S, atol=1e-5, rtol=1e-5)


def test_malora_rank_above_shared_rank_zero_fills_extra_rows():
    layer = make_layer(24, 20, small_config("malora", rank=12, shared_rank=8), "blk.proj")
    assert layer.P.shape == (4, 12, 8)
    assert torch.count_nonzero(layer.P[:, 8:]) == 0
    assert torch.count_nonzero(layer.P[:, :8]) > 0


def test_init_depends_on_seed_and_site_not_on_order():
    cfg = small_config("molora")
    a = make_layer(24, 20, cfg, "x.q")
    b = make_layer(24, 20, cfg, "x.q")
    c = make_layer(24, 20, cfg, "x.v")
    d = make_layer(24, 20, cfg.replace(seed=4), "x.q")
    assert torch.equal(a.A, b.A)
    assert not torch.equal(a.A, c.A)
    assert not torch.equal(a.A, d.A)


def test_router_keeps_top_k_probabilities_without_renormalising():
    weight = torch.randn(6, 10)
    x = torch.randn(7, 10)
    gates, probs, chosen = route(x, weight, 2, normalize=False)
    torch.testing.assert_close(probs, torch.softmax(x @ weight.T, -1))
    assert torch.all((gates > 0).sum(-1) == 2)
    assert torch.all(chosen.sum(-1) == 2)
    top = probs.topk(2, -1).values
    torch.testing.assert_close(gates.sum(-1), top.sum(-1))
    assert torch.all(gates.sum(-1) < 1)
    gates_n, _, _ = route(x, weight, 2, normalize=True)
    torch.testing.assert_close(gates_n.sum(-1), torch.ones(7))


def test_load_balancing_loss_formula_and_balance_value():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    chosen = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    f = chosen.mean(0)
    p = probs.mean(0)
    assert load_balancing_loss(probs, chosen).item() == pytest.approx(3 * float((f * p).sum()))
    uniform = torch.full((8, 4), 0.25)
    chosen_balanced = torch.tensor([[1.0, 1.0, 0, 0], [0, 0, 1.0, 1.0]] * 4)
    assert load_balancing_loss(uniform, chosen_balanced).item() == pytest.approx(2.0)


def test_load_balancing_loss_ignores_padding():
    probs = torch.softmax(torch.randn(2, 5, 4), -1)
    chosen = torch.zeros_like(probs).scatter(-1, probs.topk(2, -1).indices, 1.0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    real = mask.bool()
    expected = load_balancing_loss(probs[real], chosen[real])
    masked = load_balancing_loss(probs, chosen, mask)
    assert masked.item() == pytest.approx(expected.item(), rel=1e-6)
    padded_probs = probs.clone()
    padded_probs[0, 3:] = torch.tensor([0.97, 0.01, 0.01, 0.01])
    assert load_balancing_loss(padded_probs, chosen, mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_aux_loss_requires_a_forward_and_checks_mask_shape():
    layer, _ = _random_layer("malora")
    with pytest.raises(RuntimeError, match="no forward"):
        layer.aux_loss()
    layer(torch.randn(2, 3, 24))
    with pytest.raises(ValueError, match="token mask shape"):
        layer.aux_loss(torch.ones(2, 4))
    assert layer.aux_loss(torch.ones(2, 3)).item() > 0


@pytest.mark.parametrize("method", METHODS)
def test_layer_exports_with_dynamic_tokens(method):
    layer, _ = _random_layer(method)
    dims = {"x": {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}}
    ep = torch.export.export(layer, (torch.randn(2, 3, 24),), dynamic_shapes=dims)
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any(op.startswith(("aten.nonzero", "aten.item", "aten._local_scalar_dense")) for op in ops)
    x = torch.randn(3, 7, 24)
    torch.testing.assert_close(ep.module()(x), layer(x))


def test_dropout_applies_to_adapter_input_only_in_training():
    layer, _ = _random_layer("malora", dropout=0.5)
    x = torch.randn(4, 24)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    first = layer(x)
    torch.manual_seed(1)
    assert not torch.equal(first, layer(x))
