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


def test_write_transformers_dir_round_trips(tmp_path):
    from malora_fx.graph.sources import LoadedModel, write_transformers_dir

    model = tiny_model("tiny-llama").eval()
    write_transformers_dir(LoadedModel(model, "tiny-llama", mf.load_model("tiny-llama").tokenizer), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__] and "quantization_config" not in config
    assert (tmp_path / "hf" / ".complete").is_file() and not list(tmp_path.glob(".tmp-*"))
    loaded = mf.load_model(tmp_path / "hf")
    ids = torch.randint(0, 256, (2, 6))
    expected = main_output(model(input_ids=ids))
    torch.testing.assert_close(main_output(loaded.model(input_ids=ids)), expected, rtol=0, atol=0)


@pytest.mark.e2e
def test_packaged_gguf_loads_from_its_converted_directory(smollm2):
    """The converted directory gives the GGUF file's tensors, config and tokenizer exactly."""
    from malora_fx.graph.sources import CONVERTED, PACKAGED, _load_gguf, fetch

    folder = fetch("smollm2-135m")
    assert (folder / CONVERTED / ".complete").is_file()  # written by the first load (the smollm2 fixture)
    direct = _load_gguf(folder / PACKAGED["smollm2-135m"].entry, torch.float32)
    cached = mf.load_model("smollm2-135m")
    a, b = direct.model.state_dict(), cached.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    skip = {"quantization_config", "architectures", "_name_or_path"}  # the GGUF markers; the folder read
    diff = {k for k in direct.model.config.to_dict().keys() | cached.model.config.to_dict().keys() if k not in skip}
    assert all(direct.model.config.to_dict().get(k) == cached.model.config.to_dict().get(k) for k in diff)
    text = "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n"
    assert direct.tokenizer(text).input_ids == cached.tokenizer(text).input_ids
    assert direct.tokenizer.chat_template == cached.tokenizer.chat_template
    assert (direct.tokenizer.eos_token_id, direct.tokenizer.bos_token_id) == (
        cached.tokenizer.eos_token_id,
        cached.tokenizer.bos_token_id,
    )


def test_packaged_load_survives_a_read_only_cache(tmp_path, monkeypatch, caplog):
    """Writing converted/ is a cache: when it fails the model still loads (from the GGUF file)."""
    from malora_fx.graph import sources

    monkeypatch.setattr(sources, "fetch", lambda name: tmp_path)
    monkeypatch.setattr(sources, "_load_gguf", lambda path, dtype: sources.LoadedModel(tiny_model("tiny-llama"), "x"))

    def read_only(loaded, out, keep_complete=False):
        raise PermissionError(13, "Permission denied", str(out))

    monkeypatch.setattr(sources, "write_transformers_dir", read_only)
    loaded = sources.load_model("smollm2-135m")
    assert loaded.source == "smollm2-135m" and not (tmp_path / sources.CONVERTED).exists()
    assert "could not cache smollm2-135m as a transformers directory" in caplog.text


def test_packaged_half_precision_load_does_not_fill_the_cache(tmp_path, monkeypatch):
    """converted/ holds the de-quantised fp32 weights; an fp16 load must not write rounded ones there."""
    from malora_fx.graph import sources

    monkeypatch.setattr(sources, "fetch", lambda name: tmp_path)
    model = tiny_model("tiny-llama").half()
    monkeypatch.setattr(sources, "_load_gguf", lambda path, dtype: sources.LoadedModel(model, "x"))
    loaded = sources.load_model("smollm2-135m", dtype=torch.float16)
    assert loaded.model is model and not (tmp_path / sources.CONVERTED).exists()


def test_concurrent_fetches_keep_the_first_complete_copy(tmp_path):
    """Two processes fetching at once (sweep --jobs, parallel tests): the second rename leaves the first's files."""
    from malora_fx.fileio import atomic_directory

    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("first")
    (target / ".complete").write_text("x")
    with atomic_directory(target, keep_complete=".complete") as staging:
        (staging / "weights").write_text("second")
    assert (target / "weights").read_text() == "first"

    (target / ".complete").unlink()  # an interrupted fetch left it incomplete: replaced
    with atomic_directory(target, keep_complete=".complete") as staging:
        (staging / "weights").write_text("second")
        (staging / ".complete").write_text("x")
    assert (target / "weights").read_text() == "second" and not staging.exists()


def test_converted_cache_written_meanwhile_is_kept(tmp_path, monkeypatch, caplog):
    """Another process that finished converting first keeps its directory; no warning, no rewrite."""
    from malora_fx.graph import sources

    monkeypatch.setattr(sources, "fetch", lambda name: tmp_path)
    model = tiny_model("tiny-llama")
    calls = []

    def convert(path, dtype):  # the other process renames its copy into place while we convert
        calls.append(path)
        other = tmp_path / sources.CONVERTED
        other.mkdir()
        (other / "config.json").write_text("theirs")
        (other / ".complete").write_text("x")
        return sources.LoadedModel(model, "x")

    monkeypatch.setattr(sources, "_load_gguf", convert)
    sources.load_model("smollm2-135m")
    assert len(calls) == 1 and (tmp_path / sources.CONVERTED / "config.json").read_text() == "theirs"
    assert "could not cache" not in caplog.text and not list(tmp_path.glob(".tmp-*"))
