"""insert_adapters: structure, metadata, parity with the token-by-token reference, idempotence."""

import copy

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
from reference import hooked_reference

import malora_fx as mf
from malora_fx.errors import PassContractError
from malora_fx.passes import ADAPTED_KEY, PASS_TAG, run_passes
from malora_fx.passes.annotate_targets import AnnotateTargets
from malora_fx.passes.insert_adapters import InsertAdapters


def _inserted_nodes(gm):
    return [n for n in gm.graph.nodes if n.meta.get(PASS_TAG) == "insert_adapters"]


def test_structure_and_metadata():
    model, kwargs = tiny("tiny-llama")
    gm = mf.capture(model, kwargs)
    cfg = small_config("malora", targets="q_proj,down_proj")
    results = run_passes(gm, [AnnotateTargets(cfg.targets), InsertAdapters(cfg)])
    assert results[1].modified and results[1].matches == 4
    new = _inserted_nodes(gm)
    assert len(new) == 8
    calls = [n for n in new if n.op == "call_module"]
    adds = [n for n in new if n.target == torch.ops.aten.add.Tensor]
    assert len(calls) == 4 and len(adds) == 4
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for call in calls:
        (add,) = call.users
        base = add.args[0]
        assert base.meta[ADAPTED_KEY] in call.target.replace("__", ".")
        assert order[base] < order[call] < order[add]
        assert call.args[0] is base.args[0]  # the adapter reads the linear's input
        for key in ("val", "nn_module_stack", "stack_trace"):
            assert key in call.meta and key in add.meta
        assert list(base.users) == [add]
    gm.graph.lint()
    assert {type(m).__name__ for m in gm.malora_adapters.values()} == {"MALoRALayer"}


@pytest.mark.parametrize("name", TINY_NAMES)
@pytest.mark.parametrize("method", METHODS)
def test_output_equals_base_at_init(name, method):
    model, kwargs = tiny(name)
    gm = mf.transform(model, small_config(method), kwargs)
    diff = (main_output(gm(**kwargs)) - main_output(model(**kwargs))).abs().max().item()
    assert diff <= 1e-6


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", TINY_NAMES)
def test_random_adapters_match_reference(name, method, normalize):
    model, kwargs = tiny(name)
    cfg = small_config(method, normalize_top_k=normalize)
    gm = mf.transform(model, cfg, kwargs)
    randomize_adapters(gm, std=0.05, seed=7)
    out = main_output(gm(**kwargs))
    tensors = {
        fqn: {k: v.detach().clone() for k, v in layer.file_tensors().items()}
        for fqn, layer in mf.adapter_layers(gm).items()
    }
    with (
        torch.no_grad(),
        hooked_reference(model, tensors, method=method, top_k=cfg.top_k, scale=cfg.scale, normalize=normalize),
    ):
        expected = main_output(model(**kwargs))
    base = main_output(model(**kwargs))
    assert (expected - base).abs().max() > 1e-3  # the adapters really change the output
    assert (out - expected).abs().max().item() <= 1e-5


def test_dynamic_batch_and_sequence_after_insertion():
    model, kwargs = tiny("tiny-llama")
    gm = mf.transform(model, small_config("malora"), kwargs)
    randomize_adapters(gm)
    ids = torch.randint(0, 256, (3, 11))
    mask = torch.ones_like(ids)
    assert gm(input_ids=ids, attention_mask=mask).logits.shape == (3, 11, 258)


def test_idempotent_and_no_match():
    model, kwargs = tiny("tiny-llama")
    cfg = small_config("molora", targets="v_proj")
    gm = mf.transform(model, cfg, kwargs)
    code = gm.code
    again = run_passes(gm, [AnnotateTargets(cfg.targets), InsertAdapters(cfg)])
    assert [r.matches for r in again] == [0, 0] and not again[1].modified
    assert gm.code == code
    fresh = mf.capture(model, kwargs)
    with pytest.raises(PassContractError, match=r"^insert_adapters requires an annotated or adapted graph"):
        InsertAdapters(cfg)(fresh)  # nothing annotated: refused, not silently nothing


def test_shared_rank_larger_than_input_is_rejected_before_any_change():
    model, kwargs = tiny("tiny-llama")
    gm = mf.capture(model, kwargs)
    code = gm.code
    with pytest.raises(mf.ConfigError, match=r"shared_rank: 65 is larger than in_features=64 of model\.layers\.0"):
        mf.transform(gm, small_config("malora", shared_rank=65))
    assert gm.code == code and not hasattr(gm, "malora_adapters")


def test_plain_module_through_symbolic_trace_and_export():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(5, 8)
    for tracer in ("symbolic_trace", "export"):
        cfg = small_config("malora", shared_rank=6, targets="all-linear")
        gm = mf.transform(model, cfg, example_args=(x,), tracer=tracer)
        assert set(mf.adapter_layers(gm)) == {"0", "2"}
        torch.testing.assert_close(gm(x), model(x), atol=1e-6, rtol=0)
        randomize_adapters(gm)
        tensors = {
            f: {k: v.detach() for k, v in layer.file_tensors().items()} for f, layer in mf.adapter_layers(gm).items()
        }
        reference = copy.deepcopy(model)  # symbolic_trace shares the modules: hook a copy
        with (
            torch.no_grad(),
            hooked_reference(reference, tensors, method="malora", top_k=2, scale=cfg.scale, normalize=False),
        ):
            torch.testing.assert_close(gm(x), reference(x), atol=1e-5, rtol=0)
