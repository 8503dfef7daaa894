"""fold_adapters and lower_routing: parity, structure, allow-listed ops, idempotence, no-match."""

import pytest
import torch
from conftest import (
    METHODS,
    TINY_NAMES,
    main_output,
    randomize_adapters,
    small_config,
    tiny,
)

import malora_fx as mf
from malora_fx.adapters.folded import FoldedMixture, fold_malora_coefficients
from malora_fx.adapters.layers import AdapterLayer
from malora_fx.passes import run_passes
from malora_fx.passes.fold_adapters import FoldAdapters
from malora_fx.passes.lower_routing import LOWERED_OPS, LowerRouting


def _trained(name, method, **changes):
    model, kwargs = tiny(name)
    gm = mf.transform(model, small_config(method, **changes), kwargs)
    randomize_adapters(gm, std=0.05, seed=5)
    mf.set_adapters_training(gm, False)
    return model, gm, kwargs


def _close(a, b):
    scale = b.abs().max().item()
    return (a - b).abs().max().item() <= 1e-5 * max(scale, 1.0)


def _call_functions(gm):
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", TINY_NAMES)
def test_merged_and_lowered_match_unmerged(name, method, normalize):
    model, gm, kwargs = _trained(name, method, normalize_top_k=normalize)
    base_ops = _call_functions(mf.capture(model, kwargs))
    with torch.no_grad():
        unmerged = main_output(gm(**kwargs))
        gm = mf.merge(gm)
        merged = main_output(gm(**kwargs))
        gm = mf.lower(gm)
        lowered = main_output(gm(**kwargs))
    assert (unmerged - main_output(model(**kwargs))).abs().max() > 1e-3
    assert _close(merged, unmerged) and _close(lowered, merged)
    modules = [m for m in gm.modules() if isinstance(m, (AdapterLayer, FoldedMixture))]
    assert not modules and not any(n.op == "call_module" for n in gm.graph.nodes if "malora" in str(n.target))
    extra = _call_functions(gm) - base_ops - LOWERED_OPS
    assert not extra, f"ops outside the allow-list: {extra}"
    assert not any("nonzero" in str(t) for t in _call_functions(gm))


def test_lora_folds_into_the_base_weight_without_touching_the_model():
    model, gm, kwargs = _trained("tiny-gpt2", "lora")  # Conv1D: weight stored [n, m]
    original = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    nodes_before = len(gm.graph.nodes)
    result = FoldAdapters()(gm)
    assert result.matches == 8 and result.modified
    assert len(gm.graph.nodes) == nodes_before - 16  # one call and one add per site gone
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, original)
    assert not torch.equal(gm.get_parameter("transformer.h.0.attn.c_attn.weight"), original)
    assert not hasattr(gm, "malora_adapters")


@pytest.mark.parametrize("rank, shared, folds", [(12, 8, True), (6, 10, False)])
def test_malora_folds_p_only_where_cheaper(rank, shared, folds):
    assert fold_malora_coefficients(4, rank, shared, 64) == folds
    _, gm, kwargs = _trained("tiny-llama", "malora", rank=rank, shared_rank=shared, targets="q_proj")
    gm = mf.merge(gm)
    folded = [m for m in gm.modules() if isinstance(m, FoldedMixture)]
    assert len(folded) == 2
    assert all((m.expert_down is None) == folds for m in folded)
    assert all(m.up.shape == (4, 64, shared if folds else rank) for m in folded)


def test_idempotent_and_no_match():
    _, gm, kwargs = _trained("tiny-llama", "molora")
    gm = mf.lower(gm)
    code = gm.code
    again = run_passes(gm, [FoldAdapters(), LowerRouting()])
    assert [r.matches for r in again] == [0, 0] and gm.code == code
    model, kwargs = tiny("tiny-llama")
    plain = mf.capture(model, kwargs)
    plain_code = plain.code
    assert [r.modified for r in run_passes(plain, [FoldAdapters(), LowerRouting()])] == [False, False]
    assert plain.code == plain_code


def test_lowered_graph_exports_with_dynamic_shapes():
    _, gm, kwargs = _trained("tiny-llama", "malora")
    gm = mf.lower(gm)
    dims = {k: {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} for k in kwargs}
    ep = torch.export.export(gm, (), kwargs, dynamic_shapes=dims, strict=False)
    ids = torch.randint(0, 258, (3, 5))
    other = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    torch.testing.assert_close(ep.module()(**other).logits, gm(**other).logits)
    lowered_nodes = [n for n in gm.graph.nodes if n.meta.get("malora_fx.pass") == "lower_routing"]
    assert lowered_nodes and all("val" in n.meta for n in lowered_nodes)
