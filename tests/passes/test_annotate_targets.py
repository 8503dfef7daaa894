"""annotate_targets: suffix / regex / all-linear selection, no-match error, idempotence, no rewrite."""

import pytest
import torch
from conftest import tiny

import malora_fx as mf
from malora_fx.adapters.config import parse_targets
from malora_fx.passes import TARGET_KEY
from malora_fx.passes.annotate_targets import AnnotateTargets


def _annotated(gm):
    return sorted(n.meta[TARGET_KEY].fqn for n in gm.graph.nodes if TARGET_KEY in n.meta)


@pytest.fixture(scope="module")
def llama_graph():
    model, kwargs = tiny("tiny-llama")
    return model, kwargs


def _fresh(llama_graph):
    model, kwargs = llama_graph
    return mf.capture(model, kwargs)


def test_suffixes_select_only_named_modules(llama_graph):
    gm = _fresh(llama_graph)
    code = gm.code
    result = AnnotateTargets(parse_targets("q_proj,v_proj"))(gm)
    assert result.matches == 4 and not result.modified
    assert _annotated(gm) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert gm.code == code  # policy only: the graph is unchanged


def test_regex_is_a_full_match(llama_graph):
    gm = _fresh(llama_graph)
    AnnotateTargets(parse_targets(r"re:model\.layers\.1\.mlp\.(gate|up)_proj"))(gm)
    assert _annotated(gm) == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    gm2 = _fresh(llama_graph)
    with pytest.raises(mf.TargetError):
        AnnotateTargets(parse_targets("re:mlp"))(gm2)  # a substring is not a full match


def test_all_linear_excludes_output_head(llama_graph):
    gm = _fresh(llama_graph)
    AnnotateTargets("all-linear")(gm)
    names = _annotated(gm)
    assert len(names) == 14 and "lm_head" not in names


def test_all_linear_excludes_tied_gpt2_head_and_finds_conv1d():
    model, kwargs = tiny("tiny-gpt2")
    gm = mf.capture(model, kwargs)
    AnnotateTargets("all-linear")(gm)
    names = _annotated(gm)
    assert "lm_head" not in names
    assert names == sorted(
        f"transformer.h.{i}.{p}" for i in (0, 1) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )


def test_no_match_lists_the_linear_modules(llama_graph):
    gm = _fresh(llama_graph)
    with pytest.raises(mf.TargetError) as info:
        AnnotateTargets(("query",))(gm)
    message = str(info.value)
    assert "'query'" in message and "model.layers.0.self_attn.q_proj" in message and "lm_head" in message
    assert "\n" not in message


def test_idempotent(llama_graph):
    gm = _fresh(llama_graph)
    assert AnnotateTargets(("q_proj",))(gm).matches == 2
    assert AnnotateTargets(("q_proj",))(gm).matches == 0
    assert len(_annotated(gm)) == 2


def test_symbolic_trace_graph_of_plain_module():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    gm = mf.capture(model, example_args=(torch.randn(2, 8),), tracer="symbolic_trace")
    AnnotateTargets(("0",))(gm)
    assert _annotated(gm) == ["0"]


def test_peft_list_forms(llama_graph):
    gm = _fresh(llama_graph)
    AnnotateTargets(["all-linear"])(gm)  # PEFT users' list form of the shorthand, not a module name
    names = _annotated(gm)
    assert len(names) == 14 and "lm_head" not in names
    gm = _fresh(llama_graph)
    AnnotateTargets(["all-linear", "lm_head"])(gm)  # all-linear plus the head, named
    assert sorted(_annotated(gm)) == sorted([*names, "lm_head"])
    gm = _fresh(llama_graph)
    AnnotateTargets(["self_attn.q_proj", "up_proj"])(gm)  # names match whole '.'-separated parts
    assert _annotated(gm) == sorted(
        f"model.layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.q_proj", "mlp.up_proj")
    )
    gm = _fresh(llama_graph)
    with pytest.raises(mf.TargetError):
        AnnotateTargets(["proj"])(gm)  # 'proj' is no part of 'q_proj': a name is not a substring


def test_peft_string_is_a_full_match_regex(llama_graph):
    gm = _fresh(llama_graph)
    AnnotateTargets(r".*\.1\.self_attn\.(q|k)_proj")(gm)  # PEFT's string form, no 're:' needed
    assert _annotated(gm) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize(
    "targets, said",
    [
        (["query"], "targets ['query'] (read as: module names; a module matches a name when its full name is"),
        ("query,key", "targets ['query', 'key'] (read as: module names;"),
        ("q_proj.*x", "targets 're:q_proj.*x' (read as: a regular expression matched in full against module names)"),
        (
            ["all-linear", "query"],
            "targets ['all-linear', 'query'] (read as: all linear layers except output heads, plus ['query'])",
        ),
    ],
)
def test_no_match_says_how_the_targets_were_read(llama_graph, targets, said):
    gm = _fresh(llama_graph)
    if "all-linear" in targets:  # all-linear always matches here: use a model with no linear module
        gm = mf.capture(
            torch.nn.Sequential(torch.nn.ReLU()), example_args=(torch.randn(2, 3),), tracer="symbolic_trace"
        )
    with pytest.raises(mf.TargetError) as info:
        AnnotateTargets(targets)(gm)
    message = str(info.value)
    assert message.startswith(said) and "match no linear module" in message and "\n" not in message
