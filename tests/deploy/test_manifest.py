"""export.json as ExportManifest: round trip, strict reading, versioning, one writer."""

import json

import pytest

from malora_fx.deploy.manifest import EXPORT_FORMAT, ExportManifest
from malora_fx.errors import MaloraError


def decoder_manifest(**changes) -> ExportManifest:
    fields = dict(
        base_model="tiny-llama",
        method="malora",
        adapters="/runs/a",
        dtype="fp16",
        opset=18,
        kind="decoder",
        inputs=["input_ids", "attention_mask", "position_ids", "past_key_values.0.key", "past_key_values.0.value"],
        outputs=["logits", "present.0.key", "present.0.value"],
        kv_cache=True,
        switchable=True,
        fused=False,
        adapter_parameters={"malora_lowered.q__router": [4, 64]},
        num_layers=1,
        num_kv_heads=2,
        head_dim=16,
        vocab_size=258,
        max_positions=256,
    )
    fields.update(changes)
    return ExportManifest(**fields)


def test_round_trip_to_json_from_json():
    manifest = decoder_manifest()
    text = manifest.to_json()
    assert ExportManifest.from_json(text) == manifest
    assert ExportManifest.from_json(text).to_json() == text
    data = json.loads(text)
    assert list(data) == [
        "format",
        "base_model",
        "method",
        "adapters",
        "dtype",
        "opset",
        "kind",
        "inputs",
        "outputs",
        "kv_cache",
        "switchable",
        "fused",
        "ort_fusions",
        "moe_kernel",
        "adapter_parameters",
        "num_layers",
        "num_kv_heads",
        "head_dim",
        "vocab_size",
        "max_positions",
    ]
    assert data["format"] == EXPORT_FORMAT == "malora-fx-export/1"
    assert data["adapter_parameters"] == {"malora_lowered.q__router": [4, 64]}
    del data["ort_fusions"], data["moe_kernel"]  # written before the keys existed: plain ONNX ops
    old = ExportManifest.from_json(json.dumps(data))
    assert old.ort_fusions is False and old.moe_kernel is False


def test_non_decoder_has_no_cache_keys_and_write_read(tmp_path):
    manifest = ExportManifest(kind="graph", inputs=["input_ids"], outputs=["logits"])
    assert "num_layers" not in json.loads(manifest.to_json()) and manifest.adapters is None
    path = manifest.write(tmp_path)
    assert path == tmp_path / "export.json" and ExportManifest.read(tmp_path) == manifest
    assert ExportManifest.from_json(path) == manifest
    assert [p.name for p in tmp_path.iterdir()] == ["export.json"]  # atomic write leaves nothing behind


def test_unknown_key_is_refused_naming_it():
    data = json.loads(decoder_manifest().to_json())
    data["bench_fusion"] = {"layers": 2}
    with pytest.raises(MaloraError, match="unknown key 'bench_fusion'"):
        ExportManifest.from_json(json.dumps(data))


@pytest.mark.parametrize(
    "found, message",
    [
        (
            "malora-fx-export/2",
            "format 'malora-fx-export/2' is newer than this malora-fx supports ('malora-fx-export/1')",
        ),
        ("something-else/1", "format 'something-else/1' is not supported; supported: 'malora-fx-export/1'"),
        (None, "no 'format' key"),
    ],
)
def test_newer_or_unknown_format_is_refused(found, message):
    data = json.loads(decoder_manifest().to_json())
    data["format"] = found
    data["field_of_version_2"] = 1  # the format is checked before the keys
    if found is None:
        del data["format"]
    with pytest.raises(MaloraError) as err:
        ExportManifest.from_json(json.dumps(data))
    assert message in str(err.value)


def test_bad_files_are_refused(tmp_path):
    data = json.loads(decoder_manifest().to_json())
    del data["num_kv_heads"]
    with pytest.raises(MaloraError, match="needs 'num_kv_heads'"):
        ExportManifest.from_json(json.dumps(data))
    with pytest.raises(MaloraError, match="missing key 'inputs'"):
        ExportManifest.from_json(json.dumps({"format": EXPORT_FORMAT, "kind": "graph", "outputs": []}))
    with pytest.raises(MaloraError, match="'opset' is '18'; expected an integer"):
        ExportManifest.from_json(decoder_manifest().to_json().replace('"opset": 18', '"opset": "18"'))
    (tmp_path / "export.json").write_text("{not json")
    with pytest.raises(MaloraError, match="export.json: not valid JSON"):
        ExportManifest.read(tmp_path)
    with pytest.raises(MaloraError, match="no export.json"):
        ExportManifest.read(tmp_path / "missing")


def test_legacy_lowered_key_of_export_onnx_is_accepted():
    data = json.loads(ExportManifest(kind="graph", inputs=["x"], outputs=["output"]).to_json())
    del data["adapters"]  # export_onnx did not write it
    data["lowered"] = True
    assert ExportManifest.from_json(json.dumps(data)) == ExportManifest(kind="graph", inputs=["x"], outputs=["output"])
