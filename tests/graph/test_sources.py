"""Model sources: local directories, GGUF files, bare configs, built-in names, errors."""

import json

import pytest
import torch
from conftest import main_output

import malora_fx as mf
from malora_fx.graph.sources import BUILTIN_NAMES
from malora_fx.graph.tiny_models import tiny_model


def test_tiny_models_are_deterministic():
    a, b = tiny_model("tiny-llama"), tiny_model("tiny-llama")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert set(BUILTIN_NAMES) == {"smollm2-135m", "minilm-l6", "tiny-llama", "tiny-gpt2", "tiny-bert"}


def test_local_transformers_directory(tmp_path):
    model = tiny_model("tiny-bert")
    model.save_pretrained(tmp_path)
    loaded = mf.load_model(tmp_path)
    assert loaded.source == str(tmp_path.resolve()) and not loaded.on_meta
    ids = torch.randint(0, 256, (2, 6))
    torch.testing.assert_close(main_output(loaded.model(input_ids=ids)), main_output(model(input_ids=ids)))


def test_directory_with_only_pickle_weights_is_refused(tmp_path):
    tiny_model("tiny-llama").config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(
        mf.ModelSourceError, match="no \\*.safetensors weights \\(pickle checkpoints are never loaded\\)"
    ):
        mf.load_model(tmp_path)


def test_bare_config_builds_on_meta(tmp_path):
    path = tmp_path / "config.json"
    tiny_model("tiny-llama").config.to_json_file(path)
    loaded = mf.load_model(path)
    assert loaded.on_meta
    assert {p.device.type for p in loaded.model.parameters()} == {"meta"}


@pytest.mark.parametrize(
    "content, message",
    [
        (b"hello", "is not a GGUF file"),
    ],
)
def test_bad_gguf(tmp_path, content, message):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(mf.ModelSourceError, match=message):
        mf.load_model(path)


def test_json_that_is_not_a_config(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(mf.ModelSourceError, match='not a transformers config \\(no "model_type"\\)'):
        mf.load_model(path)


def test_unknown_fetch_name():
    with pytest.raises(
        mf.ModelSourceError, match="'tiny-llama' is not a packaged model; allowed: smollm2-135m, minilm-l6"
    ):
        mf.fetch("tiny-llama")
