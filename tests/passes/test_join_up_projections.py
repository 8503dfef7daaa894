"""join_up_projections: parity, structure, no duplicated weights, idempotence, no-match cases."""

import pytest
import torch
from conftest import METHODS, TINY_NAMES, main_output, randomize_adapters, small_config, tiny

import malora_fx as mf
from malora_fx.passes import FUSED_ATTR, LOWERED_ATTR, run_passes
from malora_fx.passes.fuse_projections import FuseProjections
from malora_fx.passes.join_up_projections import JOINED_OPS, JoinUpProjections

SIX = "q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj"
aten = torch.ops.aten


def _lowered(name, method, targets=None, fold_lora=True):
    """(model, lowered but unfused graph, kwargs) with random adapters that change the output."""
    model, kwargs = tiny(name)
    gm = mf.transform(model, small_config(method, **({"targets": targets} if targets else {})), kwargs)
    randomize_adapters(gm, std=0.05, seed=11)
    mf.set_adapters_training(gm, False)
    return model, mf.lower(mf.merge(gm) if fold_lora else gm, fold_lora=fold_lora), kwargs


def _sites(gm):
    return len(gm.meta["malora_fx"]["sites"])


def _elements(gm):
    return sum(t.numel() for t in gm.state_dict().values())


def _up_buffers(gm):
    return [name for name, _ in getattr(gm, LOWERED_ATTR).named_buffers() if name.endswith("__up")]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", TINY_NAMES)
def test_joined_matches_separate(name, method):
    # LoRA folded into W leaves no up-projection: keep it as adapter matmuls (fold_lora=False),
    # so its (x Aᵀ) (s B)ᵀ joins the base GEMM and the case can fail
    model, gm, kwargs = _lowered(name, method, fold_lora=method != "lora")
    with torch.no_grad():
        before = main_output(gm(**kwargs))
        assert (before - main_output(model(**kwargs))).abs().max() > 1e-3  # the adapters change the output
    elements = _elements(gm)
    result = JoinUpProjections()(gm)
    with torch.no_grad():
        after = main_output(gm(**kwargs))
    assert (after - before).abs().max().item() <= 1e-5 * max(before.abs().max().item(), 1.0)
    if name == "tiny-gpt2":  # GPT-2's Conv1D is view → addmm, not a linear: nothing to join
        assert result.matches == 0 and not hasattr(gm, FUSED_ATTR)
        return
    assert result.matches == _sites(gm)
    assert _elements(gm) == elements  # W and U moved into the stacked weight, not copied
    assert _up_buffers(gm) == []
    added = {n.target for n in gm.graph.nodes if n.meta.get("malora_fx.pass") == "join_up_projections"}
    assert added == JOINED_OPS if name == "tiny-bert" else added == JOINED_OPS - {aten.add.Tensor}  # bias add


def test_stacked_weights_have_the_site_shapes():
    model, gm, _ = _lowered("tiny-llama", "malora", targets=SIX)
    cfg = model.config
    n, r = 4, 6  # small_config: 4 experts of rank 6
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    JoinUpProjections()(gm)
    shapes = sorted(tuple(t.shape) for t in getattr(gm, FUSED_ATTR).buffers())
    per_layer = [(h + n * r, h), (h + n * r, kv), (h + n * r, kv), (h + n * r, i), (h + n * r, i), (i + n * r, h)]
    assert shapes == sorted(per_layer * cfg.num_hidden_layers)
    joins = [n for n in gm.graph.nodes if n.target is aten.cat.default and n.meta.get("malora_fx.pass")]
    assert len(joins) == 6 * cfg.num_hidden_layers


def test_idempotent_and_no_match_cases():
    _, gm, _ = _lowered("tiny-llama", "malora", targets="q_proj,v_proj")
    JoinUpProjections()(gm)
    code = gm.code
    assert [r.matches for r in run_passes(gm, [JoinUpProjections()])] == [0] and gm.code == code
    # an unadapted graph, and adapter tensors that must stay their own initializers, match nothing
    model, kwargs = tiny("tiny-llama")
    plain = mf.capture(model, kwargs)
    assert JoinUpProjections()(plain).matches == 0
    _, switchable, _ = _lowered("tiny-llama", "lora", targets="q_proj,v_proj", fold_lora=False)
    ups = _up_buffers(switchable)
    assert JoinUpProjections(keep_separate=(f"{LOWERED_ATTR}.",))(switchable).matches == 0
    assert _up_buffers(switchable) == ups


def test_a_base_output_read_twice_stays_apart():
    _, gm, kwargs = _lowered("tiny-llama", "molora", targets="q_proj")
    with torch.no_grad():
        before = main_output(gm(**kwargs))
    first = next(n for n in gm.graph.nodes if n.target is aten.linear.default and "q_proj" in str(n.args[1].target))
    (add,) = first.users
    # give the first base q projection a second reader: y + 0 · base, which changes nothing
    with gm.graph.inserting_before(add.next):
        zero = gm.graph.call_function(aten.mul.Tensor, (first, 0.0))
        total = gm.graph.call_function(aten.add.Tensor, (add, zero))
    add.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
    gm.graph.lint()
    gm.recompile()
    result = JoinUpProjections()(gm)
    assert result.matches == _sites(gm) - 1
    with torch.no_grad():
        torch.testing.assert_close(main_output(gm(**kwargs)), before, atol=1e-5, rtol=1e-5)


def test_lower_fuse_joins_then_fuses_routers_only():
    model, gm, _ = _lowered("tiny-llama", "malora", targets=SIX)
    cfg = model.config
    n, d = 4, 10  # 4 experts, shared rank 10: the router and S of each site read x
    h, i = cfg.hidden_size, cfg.intermediate_size
    joined = mf.lower(gm, fuse=True)
    fused = {tuple(t.shape) for name, t in getattr(joined, FUSED_ATTR).named_buffers() if "__x" in name}
    assert fused == {(h, 3 * (n + d)), (h, 2 * (n + d)), (i, n + d)}
    assert FuseProjections(only_groups_reading=(f"{LOWERED_ATTR}.",)).fusable_groups(joined) == []
    # join_up=False: the base weights join the fused GEMMs instead (the MoE-kernel export's form)
    apart = mf.lower(gm, fuse=True, join_up=False)
    assert not any(name.endswith("__up") for name, _ in getattr(apart, FUSED_ATTR).named_buffers())
    assert len(_up_buffers(apart)) == _sites(apart)
