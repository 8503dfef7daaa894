"""fuse_projections: structure, parity, no duplicated weights, idempotence, no-match, switchable."""

import operator

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
from malora_fx.passes import FUSED_ATTR, run_passes
from malora_fx.passes.fuse_projections import FUSED_OPS, FuseProjections
from malora_fx.passes.lower_routing import LOWERED_OPS

SIX = "q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj"
aten = torch.ops.aten


def _lowered(name, method, targets=None, fold_lora=True):
    model, kwargs = tiny(name)
    changes = {"targets": targets} if targets else {}
    gm = mf.transform(model, small_config(method, **changes), kwargs)
    randomize_adapters(gm, std=0.05, seed=11)
    mf.set_adapters_training(gm, False)
    return model, mf.lower(mf.merge(gm) if fold_lora else gm, fold_lora=fold_lora), kwargs


def _tensor_elements(gm):
    return sum(t.numel() for t in gm.state_dict().values())


def _unread_tensors(gm):
    """State-dict entries no get_attr node reads (they would be exported for nothing)."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    return set(gm.state_dict()) - read


def _readers_of_x(gm):
    """Projection calls (linear / matmul by a get_attr) per input node."""
    counts = {}
    for node in gm.graph.nodes:
        if (
            node.op == "call_function"
            and node.target in (aten.linear.default, aten.matmul.default)
            and isinstance(node.args[1], torch.fx.Node)
            and node.args[1].op == "get_attr"
        ):
            counts[node.args[0]] = counts.get(node.args[0], 0) + 1
    return counts


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", TINY_NAMES)
def test_fused_matches_unfused(name, method):
    # LoRA folded into W leaves nothing to fuse: lower it as adapter matmuls instead
    # (fold_lora=False), so that its A is fused with the base GEMM and the case can fail.
    fold_lora = method != "lora"
    model, gm, kwargs = _lowered(name, method, fold_lora=fold_lora)
    with torch.no_grad():
        before = main_output(gm(**kwargs))
        assert (before - main_output(model(**kwargs))).abs().max() > 1e-3  # the adapters change the output
    unread = _unread_tensors(gm)
    result = FuseProjections(only_groups_reading=("malora_lowered.",))(gm)
    with torch.no_grad():
        after = main_output(gm(**kwargs))
    assert (after - before).abs().max().item() <= 1e-5 * max(before.abs().max().item(), 1.0)
    if name == "tiny-gpt2" and method == "lora":
        # GPT-2's Conv1D is view → addmm (not a projection of x) and LoRA has one matmul per input
        assert result.matches == 0
        return
    assert result.matches > 0
    assert _unread_tensors(gm) == unread  # the fused sources are deleted, not exported twice
    added = {n.target for n in gm.graph.nodes if n.meta.get("malora_fx.pass") == "fuse_projections"}
    assert added and added <= FUSED_OPS


def test_llama_layer_becomes_three_gemms():
    model, gm, kwargs = _lowered("tiny-llama", "malora", targets=SIX)
    cfg = model.config
    n, d = 4, 10  # small_config: 4 experts, shared rank 10
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    elements = _tensor_elements(gm)
    result = FuseProjections(only_groups_reading=("malora_lowered.",))(gm)
    assert result.matches == 3 * cfg.num_hidden_layers
    assert _tensor_elements(gm) == elements  # no biases here: concatenated, never duplicated
    widths = sorted({tuple(t.shape) for t in getattr(gm, FUSED_ATTR).buffers()})
    h, i = cfg.hidden_size, cfg.intermediate_size
    assert widths == sorted({(h, h + 2 * kv + 3 * (n + d)), (h, 2 * i + 2 * (n + d)), (i, h + n + d)})
    assert max(c for x, c in _readers_of_x(gm).items()) == 1
    splits = [n for n in gm.graph.nodes if n.target is aten.split_with_sizes.default]
    assert len(splits) == 3 * cfg.num_hidden_layers
    assert all(all(u.target is operator.getitem for u in s.users) for s in splits)


def test_unrestricted_fuses_base_siblings_with_biases():
    model, kwargs = tiny("tiny-bert")  # q/k/v linears with biases
    gm = mf.capture(model, kwargs)
    elements = _tensor_elements(gm)
    with torch.no_grad():
        before = gm(**kwargs).last_hidden_state
    result = FuseProjections()(gm)
    assert result.matches == model.config.num_hidden_layers  # q/k/v of every layer
    assert _tensor_elements(gm) == elements  # every member has a bias: no zero padding
    with torch.no_grad():
        after = gm(**kwargs).last_hidden_state
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert any(name.endswith("_bias") for name, _ in getattr(gm, FUSED_ATTR).named_buffers())


def test_idempotent_and_base_only_untouched():
    _, gm, kwargs = _lowered("tiny-llama", "malora", targets=SIX)
    gm = mf.lower(gm, fuse=True)
    code = gm.code
    again = run_passes(gm, [FuseProjections(only_groups_reading=("malora_lowered.",))])
    assert [r.matches for r in again] == [0] and gm.code == code
    model, kwargs = tiny("tiny-llama")
    plain = mf.capture(model, kwargs)
    plain_code = plain.code
    plain = mf.lower(plain, fuse=True)  # no adapters: the base's q/k/v and gate/up stay separate GEMMs
    assert plain.code == plain_code and not hasattr(plain, FUSED_ATTR)


def test_switchable_adapter_tensors_stay_apart():
    _, gm, kwargs = _lowered("tiny-llama", "lora", targets="q_proj,v_proj", fold_lora=False)
    names = sorted(name for name, _ in gm.malora_lowered.named_buffers())
    gm = mf.lower(gm, fold_lora=False, fuse=True)
    assert sorted(name for name, _ in gm.malora_lowered.named_buffers()) == names
    assert not hasattr(gm, FUSED_ATTR)


def test_lowered_and_fused_ops_are_allow_listed():
    model, kwargs = tiny("tiny-llama")
    base_ops = {n.target for n in mf.capture(model, kwargs).graph.nodes if n.op == "call_function"}
    _, gm, _ = _lowered("tiny-llama", "malora", targets=SIX)
    gm = mf.lower(gm, fuse=True)
    ops = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert not ops - base_ops - LOWERED_OPS - FUSED_OPS
