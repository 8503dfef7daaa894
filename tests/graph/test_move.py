"""``move_to_device``: a graph captured on the CPU runs on another device once its device literals
are rewritten; ``GraphModule.to`` alone leaves them (the CUDA failure this fixes). The other device
here is ``meta`` (shapes only), which every machine has."""

from __future__ import annotations

import pytest
import torch

import malora_fx as mf
from malora_fx.graph.move import move_to_device
from malora_fx.graph.sources import load_model


def _graphs(gm) -> list[torch.fx.GraphModule]:
    return [m for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]


def _devices(gm) -> set[str]:
    """The device literals of the graph and of every nested graph (higher-order op bodies)."""
    found: set[str] = set()
    for graph_module in _graphs(gm):
        for node in graph_module.graph.nodes:
            torch.fx.node.map_aggregate(
                (node.args, node.kwargs), lambda v: found.add(str(v)) if isinstance(v, torch.device) else None
            )
    return found


@pytest.fixture()
def adapted():
    loaded = load_model("tiny-llama")
    config = mf.MALoRAConfig(targets="q_proj,v_proj", rank=2, shared_rank=8, num_experts=2, top_k=1)
    return mf.transform(loaded.model, config)


def test_to_alone_leaves_cpu_literals_and_fails(adapted):
    assert _devices(adapted) == {"cpu"}
    adapted.to("meta")
    ids = torch.zeros(2, 5, dtype=torch.long, device="meta")
    with pytest.raises(RuntimeError, match="meta tensor|device"):  # a copy back to the CPU literal
        adapted(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_move_to_device_rewrites_every_literal_and_runs(adapted):
    expected = adapted(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 5, dtype=torch.long))
    assert move_to_device(adapted, "meta") is adapted
    assert _devices(adapted) == {"meta"}
    assert {p.device.type for p in adapted.parameters()} == {"meta"}
    ids = torch.zeros(2, 5, dtype=torch.long, device="meta")
    logits = adapted(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert logits.device.type == "meta" and logits.shape == expected.logits.shape


def test_move_back_to_cpu_gives_the_same_logits():
    loaded = load_model("tiny-llama")
    config = mf.MALoRAConfig(targets="q_proj,v_proj", rank=2, shared_rank=8, num_experts=2, top_k=1)
    gm = mf.transform(loaded.model, config)
    with torch.no_grad():
        for p in mf.trainable_parameters(gm):
            p.copy_(torch.randn_like(p) * 0.1)
    ids = torch.randint(0, 100, (2, 6))
    before = gm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    # a round trip through another device's literals: the graph is rewritten twice, recompiled, and unchanged
    for node in gm.graph.nodes:
        node.kwargs = torch.fx.node.map_aggregate(
            node.kwargs, lambda v: torch.device("meta") if isinstance(v, torch.device) else v
        )
    gm.recompile()
    move_to_device(gm, "cpu")
    assert _devices(gm) == {"cpu"}
    torch.testing.assert_close(gm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, before)


class _Positions(torch.nn.Module):
    def forward(self, x):
        return x + torch.arange(x.shape[-1], device=torch.device("cpu"))


def test_nested_graphs_are_moved_too():
    """Some torch releases capture the rotary's autocast region as a ``wrap_with_autocast`` body: a
    GraphModule inside the graph, with literals of its own."""
    root = torch.nn.Module()
    root.body = torch.fx.symbolic_trace(_Positions())
    graph = torch.fx.Graph()
    graph.output(graph.call_module("body", (graph.placeholder("x"),)))
    outer = torch.fx.GraphModule(root, graph)
    assert _devices(outer.body) == {"cpu"} and _devices(outer) == {"cpu"}
    torch.testing.assert_close(move_to_device(outer, "cpu")(torch.zeros(2, 3)), torch.arange(3.0).expand(2, 3))
    move_to_device(outer, "meta")
    assert _devices(outer) == {"meta"} and outer(torch.zeros(2, 3, device="meta")).device.type == "meta"


def test_lifted_constants_of_a_cached_decoder_are_moved():
    """The decoder captured with its KV cache reads empty tensors kept as plain attributes."""
    from malora_fx.graph.cached_decoder import capture_decoder

    gm, example = capture_decoder(load_model("tiny-llama").model)
    lifted = [n.target for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith("lifted_tensor")]
    assert lifted and all(getattr(gm, name).device.type == "cpu" for name in lifted)
    gm.to("meta")
    assert all(getattr(gm, name).device.type == "cpu" for name in lifted)  # what Module.to leaves behind
    move_to_device(gm, "meta")
    assert all(getattr(gm, name).device.type == "meta" for name in lifted)
    assert _devices(gm) <= {"meta"}
