"""Adapter files: layout, bit-exact round trip, mismatch errors."""

import json

import pytest
import torch
from conftest import METHODS, randomize_adapters, small_config, tiny
from safetensors import safe_open

import malora_fx as mf
from malora_fx.adapters.files import CONFIG_FILE, WEIGHTS_FILE

FILE_KEYS = {
    "malora": {"S", "P", "B", "router"},
    "molora": {"A", "B", "router"},
    "hydralora": {"A", "B", "router"},
    "lora": {"A", "B"},
}


def _adapted(method, targets="q_proj,v_proj", **changes):
    model, kwargs = tiny("tiny-llama")
    gm = mf.transform(model, small_config(method, targets=targets, **changes), kwargs)
    return gm, kwargs


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_is_bit_exact(method, tmp_path):
    gm, kwargs = _adapted(method)
    randomize_adapters(gm, seed=11)
    mf.save_adapters(gm, tmp_path / "a", base_model="tiny-llama")
    other, _ = _adapted(method)
    mf.load_adapters(other, tmp_path / "a")
    for fqn, layer in mf.adapter_layers(gm).items():
        for name, tensor in layer.file_tensors().items():
            assert torch.equal(tensor, mf.adapter_layers(other)[fqn].file_tensors()[name])
    assert torch.equal(gm(**kwargs).logits, other(**kwargs).logits)


def test_file_layout_matches_the_contract(tmp_path):
    gm, _ = _adapted("malora", targets="q_proj")
    mf.save_adapters(gm, tmp_path, base_model="tiny-llama")
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["format"] == "malora-fx/1" and config["method"] == "malora" and config["base_model"] == "tiny-llama"
    for key in (
        "num_experts",
        "top_k",
        "rank",
        "shared_rank",
        "alpha",
        "beta",
        "dropout",
        "normalize_top_k",
        "aux_loss_coef",
    ):
        assert key in config
    assert config["sites"] == {
        f"model.layers.{i}.self_attn.q_proj": {"in_features": 64, "out_features": 64} for i in (0, 1)
    }
    with safe_open(str(tmp_path / WEIGHTS_FILE), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    site = "model.layers.0.self_attn.q_proj"
    assert shapes[f"{site}.S"] == (10, 64)
    assert shapes[f"{site}.P"] == (4, 6, 10)
    assert shapes[f"{site}.B"] == (4, 64, 6)
    assert shapes[f"{site}.router"] == (4, 64)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("method", METHODS)
def test_file_keys_per_method(method, tmp_path):
    gm, _ = _adapted(method, targets="q_proj")
    mf.save_adapters(gm, tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_FILE), framework="pt") as f:
        names = {k.rsplit(".", 1)[1] for k in f.keys()}
    assert names == FILE_KEYS[method]


def test_load_rejects_other_sites(tmp_path):
    gm, _ = _adapted("malora", targets="q_proj,v_proj")
    mf.save_adapters(gm, tmp_path)
    other, _ = _adapted("malora", targets="q_proj")
    with pytest.raises(mf.AdapterFileError, match="site 'model.layers.0.self_attn.v_proj' is not adapted"):
        mf.load_adapters(other, tmp_path)


def test_load_rejects_other_method(tmp_path):
    gm, _ = _adapted("molora")
    mf.save_adapters(gm, tmp_path)
    other, _ = _adapted("malora")
    with pytest.raises(mf.AdapterFileError, match="method 'molora', the model has 'malora'"):
        mf.load_adapters(other, tmp_path)


def test_load_rejects_other_shapes_and_copies_nothing(tmp_path):
    gm, _ = _adapted("malora", rank=6)
    mf.save_adapters(gm, tmp_path)
    other, _ = _adapted("malora", rank=4)
    before = {
        k: v.clone() for k, v in mf.adapter_layers(other)["model.layers.0.self_attn.q_proj"].file_tensors().items()
    }
    with pytest.raises(
        mf.AdapterFileError,
        match=r"model.layers.0.self_attn.q_proj.P has shape \[4, 6, 10\], "
        r"the model needs \[4, 4, 10\]",
    ):
        mf.load_adapters(other, tmp_path)
    after = mf.adapter_layers(other)["model.layers.0.self_attn.q_proj"].file_tensors()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_load_rejects_non_adapter_directories(tmp_path):
    gm, _ = _adapted("malora")
    with pytest.raises(mf.AdapterFileError, match="no adapter_config.json"):
        mf.load_adapters(gm, tmp_path)
    (tmp_path / CONFIG_FILE).write_text('{"format": "peft"}')
    with pytest.raises(mf.AdapterFileError, match="format is 'peft'"):
        mf.load_adapters(gm, tmp_path)


def _saved_config(tmp_path):
    gm, _ = _adapted("malora", targets="q_proj")
    mf.save_adapters(gm, tmp_path, base_model="tiny-llama")
    return gm, json.loads((tmp_path / CONFIG_FILE).read_text())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(rnak=12), r"adapter_config.json: unknown key 'rnak'; allowed: format, base_model"),
        (lambda c: c.update(format="malora-fx/2"), r"format 'malora-fx/2' is not supported .*supported: 'malora-fx/1'"),
        (lambda c: c.pop("top_k"), r"adapter_config.json: missing key 'top_k'"),
        (lambda c: c.update(top_k=99), r"adapter_config.json: top_k: 99 is larger than num_experts=4"),
    ],
    ids=["unknown-key", "newer-format", "missing-key", "bad-value"],
)
def test_adapter_config_is_read_strictly(tmp_path, edit, message):
    gm, config = _saved_config(tmp_path)
    edit(config)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(mf.AdapterFileError, match=message):
        mf.read_adapter_config(tmp_path)
    with pytest.raises(mf.AdapterFileError, match=message):
        mf.load_adapters(gm, tmp_path)


def test_config_from_dict_refuses_unknown_keys_and_replace_still_works():
    config = mf.MALoRAConfig(method="malora", rank=4)
    with pytest.raises(mf.ConfigError, match=r"unknown config key 'shared_rnak'; allowed: method, targets"):
        mf.MALoRAConfig.from_dict({**config.to_dict(), "shared_rnak": 8})
    with pytest.raises(mf.ConfigError, match=r"unknown config key 'num_expert'"):
        config.replace(num_expert=4)
    assert config.replace(top_k=1).top_k == 1
    assert config.replace(method="lora").rank == 64
    assert mf.MALoRAConfig.from_dict(config.to_dict()) == config
