"""Pass contracts: graph states, each pass refusing a graph in the wrong state, the pipelines passing their checks."""

import pytest
import torch
from conftest import main_output, randomize_adapters, small_config, tiny

import malora_fx as mf
from malora_fx.errors import MaloraError, PassContractError
from malora_fx.passes import (
    ADAPTED,
    ANNOTATED,
    CAPTURED,
    FUSED,
    LOWERED,
    MERGED,
    PassResult,
    graph_states,
    lower_pipeline,
    merge_pipeline,
    run_passes,
    transform_pipeline,
)
from malora_fx.passes.annotate_targets import AnnotateTargets
from malora_fx.passes.fold_adapters import FoldAdapters
from malora_fx.passes.fuse_projections import FuseProjections
from malora_fx.passes.insert_adapters import InsertAdapters
from malora_fx.passes.lower_routing import LowerRouting

QV = "q_proj,v_proj"


@pytest.fixture(scope="module")
def llama():
    return tiny("tiny-llama")


def _adapted(llama, method="malora"):
    model, kwargs = llama
    gm = mf.transform(model, small_config(method, targets=QV), kwargs)
    randomize_adapters(gm, std=0.05, seed=13)
    mf.set_adapters_training(gm, False)
    return gm


def _refuses(pass_, gm, message):
    code = gm.code
    with pytest.raises(PassContractError) as info:
        pass_(gm)
    text = str(info.value)
    assert text == message and "\n" not in text and isinstance(info.value, MaloraError)
    assert gm.code == code  # refused before anything changed


def test_states_along_the_pipeline(llama):
    model, kwargs = llama
    gm = mf.capture(model, kwargs)
    assert graph_states(gm) == {CAPTURED}
    cfg = small_config("malora", targets=QV)
    annotate, insert = transform_pipeline(cfg)
    annotate(gm)
    assert graph_states(gm) == {CAPTURED, ANNOTATED}
    insert(gm)
    assert graph_states(gm) == {ADAPTED}
    run_passes(gm, merge_pipeline())
    assert graph_states(gm) == {MERGED}  # routed adapters folded, still modules
    run_passes(gm, lower_pipeline(fuse=True))
    assert graph_states(gm) == {MERGED, LOWERED, FUSED}


def test_lower_routing_refuses_an_unmerged_graph(llama):
    for method in ("malora", "lora"):
        gm = _adapted(llama, method)
        _refuses(
            LowerRouting(),
            gm,
            "lower_routing requires a merged or captured graph (run merge first); this graph is adapted",
        )


def test_lower_merges_first_so_unmerged_graphs_still_lower(llama):
    model, kwargs = llama
    gm = _adapted(llama)
    with torch.no_grad():
        before = main_output(gm(**kwargs))
        assert (before - main_output(model(**kwargs))).abs().max() > 1e-3
        gm = mf.lower(gm)  # returns the lowered graph (a copy or the same one)
        after = main_output(gm(**kwargs))
    assert graph_states(gm) == {MERGED, LOWERED}
    assert (after - before).abs().max().item() <= 1e-5 * max(before.abs().max().item(), 1.0)


def test_fuse_refuses_adapted_and_merged_graphs(llama):
    gm = _adapted(llama)
    message = "fuse_projections requires a lowered or captured graph (run lower first); this graph is {}"
    _refuses(FuseProjections(), gm, message.format("adapted"))
    gm = mf.merge(gm)
    _refuses(FuseProjections(), gm, message.format("merged"))


def test_insert_refuses_an_unannotated_graph(llama):
    model, kwargs = llama
    gm = mf.capture(model, kwargs)
    _refuses(
        InsertAdapters(small_config("lora")),
        gm,
        "insert_adapters requires an annotated or adapted graph (run annotate_targets first); this graph is captured",
    )


def test_annotate_and_insert_refuse_merged_lowered_or_fused_graphs(llama):
    model, kwargs = llama
    gm = mf.lower(_adapted(llama))
    _refuses(
        AnnotateTargets("all-linear"),
        gm,
        "annotate_targets requires a captured or adapted graph (capture the model again); "
        "this graph is merged, lowered",
    )
    base = mf.capture(model, kwargs)
    FuseProjections()(base)
    _refuses(
        AnnotateTargets("all-linear"),
        base,
        "annotate_targets cannot run on a fused graph (capture the model again); this graph is captured, fused",
    )


def test_fold_refuses_an_annotated_graph(llama):
    model, kwargs = llama
    gm, _ = mf.plan(model, small_config("lora", targets=QV), kwargs)
    _refuses(
        FoldAdapters(),
        gm,
        "fold_adapters cannot run on an annotated graph (run insert_adapters first); this graph is captured, annotated",
    )


def test_a_pass_that_breaks_its_promise_is_caught(llama):
    class Lazy(FoldAdapters):  # claims to fold, does nothing
        def call(self, gm):
            return PassResult(gm, modified=False, matches=0)

        def ensures(self, gm):  # and skips its own check: the state contract still catches it
            return None

    gm = _adapted(llama)
    with pytest.raises(
        PassContractError, match=r"^fold_adapters left the graph adapted; it ensures merged or captured"
    ):
        Lazy()(gm)


@pytest.mark.parametrize(
    ("method", "fold_lora", "fuse", "final"),
    [
        ("malora", True, False, {MERGED, LOWERED}),
        ("malora", True, True, {MERGED, LOWERED, FUSED}),
        ("lora", True, True, {MERGED, LOWERED}),  # folded into W: nothing lowered to fuse
        ("lora", False, True, {MERGED, LOWERED}),  # switchable: adapter tensors stay apart
        ("hydralora", False, False, {MERGED, LOWERED}),
    ],
)
def test_pipelines_pass_their_checks_and_are_idempotent(llama, method, fold_lora, fuse, final):
    gm = _adapted(llama, method)
    results = run_passes(gm, merge_pipeline() if fold_lora else [FoldAdapters(fold_lora=False)])
    assert graph_states(gm) == ({MERGED, LOWERED} if method == "lora" and fold_lora else {MERGED})
    assert run_passes(gm, merge_pipeline() if fold_lora else [FoldAdapters(fold_lora=False)])[0].matches == 0
    results = run_passes(gm, lower_pipeline(fold_lora, fuse))
    assert graph_states(gm) == final
    code = gm.code
    again = run_passes(gm, lower_pipeline(fold_lora, fuse))  # idempotent: no match, no error
    assert all(r.matches == 0 for r in again) and gm.code == code
    assert results[0].matches == 0  # already merged above


def test_a_graph_without_adapters_goes_through_every_post_training_pass(llama):
    model, kwargs = llama
    gm = mf.capture(model, kwargs)
    with torch.no_grad():
        before = main_output(gm(**kwargs))
    run_passes(gm, merge_pipeline() + lower_pipeline(fuse=True))
    assert graph_states(gm) == {CAPTURED}  # lower(fuse=True) leaves base-only groups alone
    result = FuseProjections()(gm)  # tools/bench_fusion.py: the base's q/k/v and gate/up
    assert result.matches > 0 and graph_states(gm) == {CAPTURED, FUSED}
    assert FuseProjections()(gm).matches == 0
    with torch.no_grad():
        after = main_output(gm(**kwargs))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
