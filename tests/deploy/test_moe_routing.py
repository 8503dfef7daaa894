"""moe_routing (``export --moe-kernel``): each lowered routed adapter becomes one onnxruntime MoE node
(top-k experts only) with PyTorch's logits; what it must leave alone, and the option's errors."""

import onnx
import pytest
from test_onnx_export import assert_export_matches_run, make_run

from malora_fx.cli import main
from malora_fx.deploy.manifest import ExportManifest
from malora_fx.deploy.onnx_export import export_run
from malora_fx.deploy.onnx_passes import moe_routing

SIX = "q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj"  # widths in = out, in > out (k, v, down), in < out


def _ops(out) -> list[tuple[str, str]]:
    return [(n.domain, n.op_type) for n in onnx.load(str(out / "model.onnx")).graph.node]


@pytest.mark.parametrize(
    ("method", "changes"),
    [
        ("malora", {}),
        ("molora", {}),
        ("hydralora", {}),
        ("malora", {"normalize_top_k": True, "top_k": 3}),
    ],
)
def test_every_routed_site_becomes_one_moe_node_with_pytorchs_logits(method, changes, tmp_path):
    run = make_run(tmp_path / "run", "tiny-llama", method, targets=SIX, **changes)
    out = export_run(run, tmp_path / "moe", moe_kernel=True)
    ops = _ops(out)
    assert ops.count(("com.microsoft", "MoE")) == 2 * 6  # 2 layers x 6 sites
    assert not {("", "TopK"), ("", "ScatterElements"), ("", "Softmax")} & set(ops)
    assert ExportManifest.read(out).moe_kernel is True
    assert_export_matches_run(out, run, seed=1)


def test_moe_attributes_and_expert_weights_follow_the_config(tmp_path):
    run = make_run(tmp_path / "run", "tiny-llama", "malora", targets="q_proj,up_proj", top_k=3)
    graph = onnx.load(str(export_run(run, tmp_path / "moe", moe_kernel=True) / "model.onnx")).graph
    weights = {i.name: tuple(i.dims) for i in graph.initializer}
    nodes = [n for n in graph.node if n.op_type == "MoE"]
    assert len(nodes) == 4
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"k": 3, "activation_type": b"identity", "normalize_routing_weights": 0}
        fc1, fc2 = weights[node.input[2]], weights[node.input[4]]
        assert fc1[:2] == (4, 6) and fc2[0] == 4 and fc2[2] == 6 and fc1[2] == fc2[1]  # 4 experts of rank 6
    assert sorted(weights[n.input[2]][2] for n in nodes) == [64, 64, 128, 128]  # q: 64 -> 64; up: 64 -> 128


def test_left_plain_without_routing_in_fp16_and_when_not_asked(tmp_path):
    lora = make_run(tmp_path / "lora", "tiny-llama", "lora", targets=SIX)
    out = export_run(lora, tmp_path / "lora-moe", moe_kernel=True)
    assert ("com.microsoft", "MoE") not in _ops(out) and ExportManifest.read(out).moe_kernel is False
    run = make_run(tmp_path / "run", "tiny-llama", "malora", targets=SIX)
    half = export_run(run, tmp_path / "fp16", dtype="fp16", moe_kernel=True)
    assert ("com.microsoft", "MoE") not in _ops(half) and ExportManifest.read(half).moe_kernel is False
    default = export_run(run, tmp_path / "default")
    assert ("com.microsoft", "MoE") not in _ops(default) and ("", "TopK") in _ops(default)


def test_an_onnxruntime_without_moe_leaves_the_sites_plain(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(moe_routing, "onnxruntime_lacks_moe", lambda: "onnxruntime 0.0 has no MoE kernel")
    run = make_run(tmp_path / "run", "tiny-llama", "malora", targets=SIX)
    out = export_run(run, tmp_path / "moe", moe_kernel=True)
    assert ("com.microsoft", "MoE") not in _ops(out) and ExportManifest.read(out).moe_kernel is False
    assert "onnxruntime 0.0 has no MoE kernel; routed adapters left as plain ops" in caplog.text


def test_the_installed_onnxruntime_has_the_kernel():
    assert moe_routing.onnxruntime_lacks_moe() is None


@pytest.mark.parametrize("other", ["--no-ort-fusions", "--switchable", "--base-only"])
def test_cli_moe_kernel_refuses_what_it_cannot_apply_to(other, tmp_path, capsys):
    run = make_run(tmp_path / "run", "tiny-llama", "malora")
    assert main(["export", str(run), "--out", str(tmp_path / "o"), "--moe-kernel", other]) == 2
    err = capsys.readouterr().err
    assert err.startswith("malora-fx: error: --moe-kernel: writes onnxruntime MoE nodes") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
