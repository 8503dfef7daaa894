"""group_routing: the sites that read one input share one gating chain; same logits as before the pass
and as PyTorch, for every routed method; what it leaves alone."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from test_onnx_export import assert_export_matches_run, make_run

from malora_fx.deploy import onnx_passes
from malora_fx.deploy.onnx_export import export_run
from malora_fx.deploy.onnx_passes.group_routing import group_routed_sites
from malora_fx.deploy.runner import OrtGenerator

SIX = "q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj"


def _ops(out):
    return [n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node]


def _export_without_grouping(run, out, monkeypatch):
    """The same export with group_routing left out of the pass list (the 'before' graph)."""
    with monkeypatch.context() as patch:
        kept = [p for p in onnx_passes.EXPORT_PASSES if p[0] != "group_routing"]
        patch.setattr(onnx_passes, "EXPORT_PASSES", kept)
        return export_run(run, out)


def _prefill_logits(out):
    gen = OrtGenerator(out, "cpu")
    ids = np.random.default_rng(3).integers(0, 258, size=(2, 5))
    logits, _ = gen.step(ids, np.ones_like(ids), np.tile(np.arange(5), (2, 1)), gen.empty_past(2))
    return logits


@pytest.mark.parametrize(
    ("method", "changes"),
    [("malora", {}), ("molora", {}), ("hydralora", {}), ("malora", {"normalize_top_k": True, "top_k": 3})],
)
def test_grouped_graph_gives_the_same_logits(method, changes, tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", "tiny-llama", method, targets=SIX, **changes)
    before = _export_without_grouping(run, tmp_path / "before", monkeypatch)
    after = export_run(run, tmp_path / "after")
    # 2 layers x 6 sites: q/k/v and gate/up each routed together, down alone
    assert _ops(before).count("TopK") == 12 and _ops(after).count("TopK") == 2 * 3
    assert len(_ops(after)) < len(_ops(before))
    np.testing.assert_allclose(_prefill_logits(after), _prefill_logits(before), rtol=0, atol=1e-5)
    assert_export_matches_run(after, run, seed=4)  # and PyTorch's, with 3 cached decode steps


def test_idempotent_and_left_alone(tmp_path):
    run = make_run(tmp_path / "run", "tiny-llama", "malora", targets=SIX)
    model = ir.load(str(export_run(run, tmp_path / "out") / "model.onnx"))
    assert not group_routed_sites(model).modified and model.meta["group_routing"] == 0
    # one routed site per input: nothing to group; LoRA: nothing routed
    single = export_run(make_run(tmp_path / "q", "tiny-llama", "malora", targets="q_proj"), tmp_path / "q-out")
    assert _ops(single).count("TopK") == 2
    lora = export_run(make_run(tmp_path / "lora", "tiny-llama", "lora", targets=SIX), tmp_path / "lora-out")
    assert "TopK" not in _ops(lora)
