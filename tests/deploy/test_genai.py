"""onnxruntime-genai serving: every decoder export is an og model folder; og, the ORT runner and PyTorch agree.

The PyTorch reference here is an independent greedy loop over the eager model (full recompute, no cache):
it shares no code with either runner.
"""

import json
import sys

import numpy as np
import onnxruntime_genai as og  # the genai extra (.ci/run installs it)
import pytest
import torch
from conftest import randomize_adapters, small_config, tiny
from transformers import AutoModelForCausalLM, MistralConfig, Phi3Config, Qwen2Config

import malora_fx as mf
from malora_fx.adapters.run_dir import load_run
from malora_fx.cli import main
from malora_fx.deploy.adapter_file import export_adapter
from malora_fx.deploy.backends import choose_backend, open_generator
from malora_fx.deploy.bench import GenaiTimer, ort_runner, time_once
from malora_fx.deploy.genai_folder import GENAI_CONFIG, genai_model_type
from malora_fx.deploy.genai_runner import GenaiGenerator
from malora_fx.deploy.onnx_export import export_decoder_graph, export_run
from malora_fx.deploy.runner import OrtGenerator
from malora_fx.errors import MaloraError
from malora_fx.graph.cached_decoder import capture_decoder
from malora_fx.graph.tiny_models import TINY_VOCAB, tiny_tokenizer

PROMPT = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]  # "Hello, world" in the byte tokenizer
EOS = 257


@torch.no_grad()
def torch_greedy(forward, prompt, new_tokens: int, stop: int = EOS) -> list[int]:
    """Greedy tokens of ``forward(ids) -> logits``, recomputing the whole sequence each step."""
    ids, out = list(prompt), []
    for _ in range(new_tokens):
        token = int(forward(torch.tensor([ids])).argmax(-1)[0, -1])
        if token == stop:
            break
        out.append(token)
        ids.append(token)
    return out


def make_run(path, seed: int, method: str = "malora"):
    model, kwargs = tiny("tiny-llama")
    gm = mf.transform(model, small_config(method), kwargs)
    randomize_adapters(gm, std=0.08, seed=seed)
    mf.save_adapters(gm, path, base_model="tiny-llama")
    return path


def run_forward(run):
    gm, _ = load_run(str(run))
    return lambda ids: gm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_genai_config_describes_the_export(tmp_path):
    out = export_run(make_run(tmp_path / "run", seed=1), tmp_path / "exp")
    config = json.loads((out / GENAI_CONFIG).read_text())
    model = mf.load_model("tiny-llama").model.config
    decoder = config["model"]["decoder"]
    assert config["model"]["type"] == "llama"
    assert (decoder["head_size"], decoder["hidden_size"]) == (model.hidden_size // model.num_attention_heads, 64)
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"]) == (4, 2)
    assert decoder["num_hidden_layers"] == model.num_hidden_layers == 2
    assert decoder["filename"] == "model.onnx"
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert config["model"]["eos_token_id"] == EOS and config["model"]["pad_token_id"] == 256
    assert config["model"]["context_length"] == model.max_position_embeddings
    assert config["model"]["vocab_size"] == TINY_VOCAB
    assert config["search"]["past_present_share_buffer"] is False


def test_model_types():
    assert [genai_model_type(t) for t in ("llama", "qwen2", "gemma3_text", "gpt2", "falcon", None)] == [
        "llama",
        "qwen2",
        "gemma3_text",
        "decoder",
        "decoder",
        "decoder",
    ]


def test_genai_equals_ort_runner_equals_pytorch_on_a_lowered_malora_export(tmp_path):
    run = make_run(tmp_path / "run", seed=2)
    out = export_run(run, tmp_path / "exp")
    expected = torch_greedy(run_forward(run), PROMPT, 20)
    assert len(expected) >= 5  # enough tokens to compare
    genai = list(GenaiGenerator(out).generate(PROMPT, max_new_tokens=20, stop_ids={EOS}))
    ort = list(OrtGenerator(out, "cpu").generate(PROMPT, max_new_tokens=20, stop_ids={EOS}))
    bound = list(OrtGenerator(out, "cpu", io_binding=True).generate(PROMPT, max_new_tokens=20, stop_ids={EOS}))
    assert genai == ort == bound == expected


def test_two_adapter_files_switched_between_two_og_generators(tmp_path):
    run_a, run_b = make_run(tmp_path / "a", seed=3), make_run(tmp_path / "b", seed=4)
    out = export_run(run_a, tmp_path / "exp", switchable=True)
    file_a = export_adapter(run_a, tmp_path / "a.onnx_adapter")
    file_b = export_adapter(run_b, tmp_path / "b.onnx_adapter")
    want_a = torch_greedy(run_forward(run_a), PROMPT, 16)
    want_b = torch_greedy(run_forward(run_b), PROMPT, 16)
    assert want_a != want_b  # the adapters matter, so the switch can be seen
    gen = GenaiGenerator(out)
    stream_a = gen.generate(PROMPT, max_new_tokens=16, stop_ids={EOS}, adapter=file_a)
    stream_b = gen.generate(PROMPT, max_new_tokens=16, stop_ids={EOS}, adapter=file_b)
    got_a, got_b = [], []
    for token_a, token_b in zip(stream_a, stream_b, strict=False):  # two og generators alive at once, interleaved
        got_a.append(token_a)
        got_b.append(token_b)
    got_a += list(stream_a)
    got_b += list(stream_b)
    assert (got_a, got_b) == (want_a, want_b)
    ort = OrtGenerator(out, "cpu", io_binding=True)  # IOBinding binds the adapter tensors as inputs
    assert list(ort.generate(PROMPT, max_new_tokens=16, stop_ids={EOS}, adapter=file_b)) == want_b


def _family_model(family: str):
    common = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=256,
        bos_token_id=0,
        eos_token_id=EOS,
    )
    config = {"qwen2": Qwen2Config, "mistral": MistralConfig, "phi3": Phi3Config}[family](**common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", ["qwen2", "mistral", "phi3", "gpt2"])
def test_og_generates_from_other_decoder_families(family, tmp_path):
    model = tiny("tiny-gpt2")[0] if family == "gpt2" else _family_model(family)
    gm, example = capture_decoder(model)
    out = export_decoder_graph(gm, example, model.config, tmp_path / "exp", tokenizer=tiny_tokenizer())
    assert json.loads((out / GENAI_CONFIG).read_text())["model"]["type"] == genai_model_type(family)
    expected = torch_greedy(lambda ids: model(input_ids=ids).logits, PROMPT, 12)
    assert list(GenaiGenerator(out).generate(PROMPT, max_new_tokens=12, stop_ids={EOS})) == expected


def test_fp16_export_runs_under_og(tmp_path):
    run = make_run(tmp_path / "run", seed=5)
    out = export_run(run, tmp_path / "exp", dtype="fp16")
    genai = list(GenaiGenerator(out).generate(PROMPT, max_new_tokens=8, stop_ids={EOS}))
    ort = list(OrtGenerator(out, "cpu").generate(PROMPT, max_new_tokens=8, stop_ids={EOS}))
    assert genai == ort and len(genai) == 8


def test_io_binding_logits_equal_plain_run(tmp_path):
    run = make_run(tmp_path / "run", seed=6)
    out = export_run(run, tmp_path / "exp", switchable=True)
    adapter = export_adapter(make_run(tmp_path / "other", seed=7), tmp_path / "o.onnx_adapter")
    plain, bound = OrtGenerator(out, "cpu"), OrtGenerator(out, "cpu", io_binding=True)
    ids = np.asarray([PROMPT], dtype=np.int64)
    for file in (None, adapter):
        caches = [plain.new_cache(1, file), bound.new_cache(1, file)]
        first = [c(ids, np.ones_like(ids), np.arange(ids.shape[1])[None]) for c in caches]
        step = [c(ids[:, :1], np.ones((1, ids.shape[1] + 1), np.int64), np.array([[ids.shape[1]]])) for c in caches]
        np.testing.assert_allclose(first[0], first[1], rtol=0, atol=1e-6)
        np.testing.assert_allclose(step[0], step[1], rtol=0, atol=1e-6)
    with_adapter = bound.new_cache(1, adapter)(ids, np.ones_like(ids), np.arange(ids.shape[1])[None])
    assert np.abs(with_adapter - first[1]).max() < 1e-6  # (first[1] was computed with the adapter too)
    assert np.abs(with_adapter - plain.new_cache(1)(ids, np.ones_like(ids), np.arange(12)[None])).max() > 1e-3


def test_backend_choice_and_timers(tmp_path):
    out = export_run(make_run(tmp_path / "run", seed=8), tmp_path / "exp")
    assert choose_backend("genai", out) == "genai" and choose_backend("ort", out) == "ort"
    assert isinstance(open_generator(out, "genai"), GenaiGenerator)
    # auto: og on CUDA only (on CPU the ORT runner is faster with these exports); this machine has no CUDA
    assert choose_backend("auto", out) == ("genai" if og.is_cuda_available() else "ort")
    assert choose_backend("auto", out, "cpu") == "ort"
    prefill, decode = time_once(ort_runner(OrtGenerator(out, "cpu", io_binding=True)), 1, 8, 3, 200)
    assert prefill > 0 and decode > 0


def test_genai_timer(tmp_path):
    out = export_run(make_run(tmp_path / "run", seed=8), tmp_path / "exp")
    prefill, decode = time_once(GenaiTimer(GenaiGenerator(out)), 1, 16, 4, 200)
    assert prefill > 0 and decode > 0
    with pytest.raises(MaloraError, match="--batch: 2; onnxruntime-genai is timed at batch 1 only"):
        time_once(GenaiTimer(GenaiGenerator(out)), 2, 16, 4, 200)


def test_cli_run_backends_agree(tmp_path, capsys):
    run = make_run(tmp_path / "run", seed=2)
    out = export_run(run, tmp_path / "exp")
    texts = {}
    for backend in ("genai", "ort"):
        assert main(["run", str(out), "--prompt", "hi", "--raw", "--max-new-tokens", "6", "--backend", backend]) == 0
        captured = capsys.readouterr()
        texts[backend] = captured.out
        assert ("onnxruntime-genai cpu" if backend == "genai" else "onnxruntime CPUExecutionProvider") in captured.err
    assert texts["genai"] == texts["ort"] and texts["ort"].strip()


# --- bad input: one line, exit 2 -----------------------------------------------------------------


def _one_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if "error: " in line]
    assert len(err) == 1, err
    return err[0]


def test_adapter_of_another_export_is_refused_by_og(tmp_path, capsys):
    out = export_run(make_run(tmp_path / "run", seed=1), tmp_path / "exp", switchable=True)
    other = make_run(tmp_path / "other", seed=1, method="molora")
    foreign = export_adapter(other, tmp_path / "f.onnx_adapter")
    argv = ["run", str(out), "--prompt", "x", "--backend", "genai", "--adapter", str(foreign)]
    assert main(argv) == 2
    assert "was made for another export" in _one_error(capsys)


def test_genai_without_the_extra(tmp_path, capsys, monkeypatch):
    out = export_run(make_run(tmp_path / "run", seed=1), tmp_path / "exp")
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import fails as if not installed
    assert main(["run", str(out), "--prompt", "x", "--backend", "genai"]) == 2
    line = _one_error(capsys)
    assert "onnxruntime-genai is not installed; install the genai extra" in line and "--backend ort" in line
    assert choose_backend("auto", out) == "ort"  # auto falls back to the ORT runner
    assert main(["run", str(out), "--prompt", "x", "--max-new-tokens", "2"]) == 0


def test_encoder_export_asked_for_og(tmp_path, capsys):
    model, kwargs = tiny("tiny-bert")
    gm = mf.transform(model, small_config("lora"), kwargs)
    mf.save_adapters(gm, tmp_path / "run", base_model="tiny-bert")
    out = export_run(tmp_path / "run", tmp_path / "exp")
    assert not (out / GENAI_CONFIG).exists()
    assert main(["run", str(out), "--prompt", "x", "--backend", "genai"]) == 2
    assert "encoder export without a KV cache cannot be served by onnxruntime-genai" in _one_error(capsys)
