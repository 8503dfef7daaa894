"""ONNX export (KV cache, names, checker) and onnxruntime parity with PyTorch."""

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import METHODS, randomize_adapters, small_config, tiny

import malora_fx as mf
from malora_fx.adapters.run_dir import load_run
from malora_fx.cli import main
from malora_fx.deploy.manifest import EXPORT_FORMAT, ExportManifest
from malora_fx.deploy.onnx_export import export_run
from malora_fx.deploy.runner import OrtGenerator
from malora_fx.training.evaluate import greedy_generate


def make_run(path, name, method, **changes):
    model, kwargs = tiny(name)
    gm = mf.transform(model, small_config(method, **changes), kwargs)
    randomize_adapters(gm, std=0.05, seed=9)
    mf.save_adapters(gm, path, base_model=name)
    return path


@pytest.mark.parametrize("method", METHODS)
def test_decoder_export_matches_pytorch(method, tmp_path):
    run = make_run(tmp_path / "run", "tiny-llama", method)
    out = export_run(run, tmp_path / "export")
    model = onnx.load(str(out / "model.onnx"))
    assert model.opset_import[0].version >= 18
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    assert inputs == [
        "input_ids",
        "attention_mask",
        "position_ids",
        "past_key_values.0.key",
        "past_key_values.0.value",
        "past_key_values.1.key",
        "past_key_values.1.value",
    ]
    assert outputs == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    # onnxruntime's fused norms: 2 per layer (input norm, post-attention norm), the final one plain or skip
    assert ops.count(("com.microsoft", "SkipSimplifiedLayerNormalization")) >= 3
    assert ("", "ReduceMean") not in ops and ("", "Pow") not in ops  # no RMSNorm left decomposed
    manifest = ExportManifest.read(out)  # export.json parses, and is exactly what the manifest writes
    assert (out / "export.json").read_text() == manifest.to_json()
    assert (manifest.format, manifest.kind, manifest.method, manifest.kv_cache) == (
        EXPORT_FORMAT,
        "decoder",
        method,
        True,
    )
    assert (manifest.inputs, manifest.outputs) == (tuple(inputs), tuple(outputs))
    assert (manifest.num_layers, manifest.num_kv_heads, manifest.head_dim) == (2, 2, 16)
    assert manifest.adapters == str(run.resolve())

    gen, gm, ids, ref = assert_export_matches_run(out, run, seed=0)
    with torch.no_grad():
        base = tiny("tiny-llama")[0](input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(ref - base).max() > 1e-3  # the adapters matter

    prompt = list(ids[0])
    ort_tokens = list(gen.generate(prompt, max_new_tokens=32))
    pt_tokens = greedy_generate(
        lambda i, m: gm(input_ids=i, attention_mask=m).logits, [prompt], max_new_tokens=32, stop_ids=set(), pad_id=256
    )[0]
    assert ort_tokens == pt_tokens


def assert_export_matches_run(out, run, seed: int):
    """A 2 x 7 prefill and 3 cached decode steps of the export ``out`` give the logits of ``run``'s
    PyTorch graph (1e-4 relative); returns the generator, the graph, the ids and the prefill logits."""
    gen = OrtGenerator(out, "cpu")
    gm, _ = load_run(str(run))
    ids = np.random.default_rng(seed).integers(0, 258, size=(2, 7))
    logits, past = gen.step(ids, np.ones_like(ids), np.tile(np.arange(7), (2, 1)), gen.empty_past(2))
    with torch.no_grad():
        ref = gm(input_ids=torch.tensor(ids), attention_mask=torch.ones(2, 7, dtype=torch.long)).logits.numpy()
    assert np.abs(logits - ref).max() <= 1e-4 * np.abs(ref).max()
    assert past["past_key_values.0.key"].shape == (2, 2, 7, 16)
    assert_cached_decode_matches(gen, gm, ids, past, steps=3)
    return gen, gm, ids, ref


def assert_cached_decode_matches(gen, gm, ids, past, steps: int) -> None:
    """``steps`` decode steps through the KV cache give PyTorch's full-recompute logits (1e-4 relative)."""
    seq = torch.tensor(ids)
    for _ in range(steps):
        with torch.no_grad():
            ref = gm(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1].numpy()
        nxt = ref.argmax(-1)[:, None]
        seq = torch.cat([seq, torch.tensor(nxt)], 1)
        n = seq.shape[1]
        logits, past = gen.step(nxt, np.ones((2, n), np.int64), np.full((2, 1), n - 1), past)
        with torch.no_grad():
            ref = gm(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1].numpy()
        assert np.abs(logits[:, -1] - ref).max() <= 1e-4 * np.abs(ref).max()


def test_base_only_decoder_export_matches_the_base_model(tmp_path):
    """--base-only hands torch.export's program straight to torch.onnx: the base model's logits, with cache."""
    run = make_run(tmp_path / "run", "tiny-llama", "malora")
    out = export_run(run, tmp_path / "base", base_only=True)
    manifest = ExportManifest.read(out)
    assert manifest.method is None and manifest.kv_cache and not manifest.fused
    base = tiny("tiny-llama")[0].eval()
    gen = OrtGenerator(out, "cpu")
    ids = np.random.default_rng(4).integers(0, 258, size=(2, 5))
    logits, past = gen.step(ids, np.ones_like(ids), np.tile(np.arange(5), (2, 1)), gen.empty_past(2))
    with torch.no_grad():
        ref = base(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(logits - ref).max() <= 1e-4 * np.abs(ref).max()
    assert_cached_decode_matches(gen, lambda **kw: base(**kw), ids, past, steps=3)


def test_decoder_export_without_ort_fusions_is_plain_onnx(tmp_path):
    """--no-ort-fusions: standard ONNX ops only, the same logits as the fused graph (1e-5 relative)."""
    run = make_run(tmp_path / "run", "tiny-llama", "malora")
    fused, plain = export_run(run, tmp_path / "fused"), export_run(run, tmp_path / "plain", ort_fusions=False)
    model = onnx.load(str(plain / "model.onnx"))
    assert {n.domain for n in model.graph.node} == {""} and not model.functions
    assert "SimplifiedLayerNormalization" not in {n.op_type for n in model.graph.node}
    assert not ExportManifest.read(plain).ort_fusions and ExportManifest.read(fused).ort_fusions
    ids = np.random.default_rng(3).integers(0, 258, size=(2, 6))
    feeds = (ids, np.ones_like(ids), np.tile(np.arange(6), (2, 1)))
    a = OrtGenerator(fused, "cpu").step(*feeds, OrtGenerator(fused, "cpu").empty_past(2))[0]
    b = OrtGenerator(plain, "cpu").step(*feeds, OrtGenerator(plain, "cpu").empty_past(2))[0]
    assert 0 < np.abs(a - b).max() <= 1e-5 * np.abs(b).max()  # not the same graph, the same numbers


def test_encoder_export_and_base_only(tmp_path):
    run = make_run(tmp_path / "run", "tiny-bert", "malora")
    out = export_run(run, tmp_path / "export")
    meta = json.loads((out / "export.json").read_text())
    assert meta["kind"] == "encoder" and not meta["kv_cache"]
    assert meta["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert "num_layers" not in meta  # decoder keys only for KV-cache exports
    assert ExportManifest.read(out).to_dict() == meta
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(1).integers(0, 258, size=(3, 5))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    (hidden,) = session.run(["last_hidden_state"], feeds)
    gm, _ = load_run(str(run))
    ref = gm(**{k: torch.tensor(v) for k, v in feeds.items()}).last_hidden_state.detach().numpy()
    assert np.abs(hidden - ref).max() <= 1e-4
    base_out = export_run(run, tmp_path / "base", base_only=True)
    assert json.loads((base_out / "export.json").read_text())["method"] is None


def test_cli_export_and_run(tmp_path, capsys):
    run = make_run(tmp_path / "run", "tiny-llama", "malora")
    assert main(["export", str(run), "--out", str(tmp_path / "exp")]) == 0
    assert "with KV cache" in capsys.readouterr().out
    assert main(["run", str(tmp_path / "exp"), "--prompt", "abc", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert "onnxruntime CPUExecutionProvider" in captured.err
    assert main(["export", str(run), "--out", str(tmp_path / "plain"), "--no-ort-fusions"]) == 0
    assert not ExportManifest.read(tmp_path / "plain").ort_fusions and ExportManifest.read(tmp_path / "exp").ort_fusions
    stages = [
        line.split(":")[2].strip() for line in capsys.readouterr().err.splitlines() if "malora-fx: export: " in line
    ]
    assert stages[:6] == ["load", "capture", "adapters", "translate", "onnx passes", "save"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "{tmp}", "--prompt", "x"], "no model.onnx / export.json"),
        (["run", "{exp}", "--prompt", "x", "--provider", "tpu"], "unknown provider 'tpu'; allowed: auto, cuda, cpu"),
        (["run", "{exp}", "--prompt", "x" * 300], "exceeds the model's context of 256 positions"),
        (["export", "{run}", "--out", "{tmp}/e2", "--dtype", "int4"], "--dtype: 'int4'; allowed: fp32, fp16"),
        (["export", "{run}", "--out", "{tmp}/e3", "--opset", "13"], "--opset: 13 is too old"),
    ],
)
def test_bad_input_exit_2(argv, message, tmp_path, capsys):
    run = make_run(tmp_path / "run", "tiny-llama", "lora")
    exp = tmp_path / "exp"
    if "{exp}" in " ".join(argv):
        export_run(run, exp)
    code = main([a.format(tmp=tmp_path, exp=exp, run=run) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1]
    assert not (tmp_path / "e2").exists() and not (tmp_path / "e3").exists()


def _logits(gen, ids, options=None):
    return gen.step(
        ids,
        np.ones_like(ids),
        np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1)),
        gen.empty_past(ids.shape[0]),
        options,
    )[0]


@pytest.mark.parametrize("method", ["malora", "lora"])
def test_one_session_serves_two_adapter_files(method, tmp_path):
    run_a = make_run(tmp_path / "a", "tiny-llama", method)
    model, kwargs = tiny("tiny-llama")
    gm_b = mf.transform(model, small_config(method), kwargs)
    randomize_adapters(gm_b, std=0.05, seed=123)
    mf.save_adapters(gm_b, tmp_path / "b", base_model="tiny-llama")
    assert main(["export", str(run_a), "--out", str(tmp_path / "served"), "--switchable"]) == 0
    for name in ("a", "b"):
        adapter = str(tmp_path / f"{name}.onnx_adapter")
        assert main(["export", str(tmp_path / name), "--adapter-only", "--out", adapter]) == 0
    served = OrtGenerator(tmp_path / "served", "cpu")
    ids = np.random.default_rng(3).integers(0, 258, size=(2, 6))
    for name in ("a", "b"):
        own = OrtGenerator(export_run(tmp_path / name, tmp_path / f"own-{name}"), "cpu")
        swapped = _logits(served, ids, served.run_options(tmp_path / f"{name}.onnx_adapter"))
        assert np.abs(swapped - _logits(own, ids)).max() <= 1e-4
    assert (
        np.abs(
            _logits(served, ids, served.run_options(tmp_path / "a.onnx_adapter"))
            - _logits(served, ids, served.run_options(tmp_path / "b.onnx_adapter"))
        ).max()
        > 1e-3
    )


def test_adapter_for_another_export_is_rejected(tmp_path, capsys):
    run = make_run(tmp_path / "run", "tiny-llama", "malora")
    other = make_run(tmp_path / "other", "tiny-llama", "malora", targets="q_proj")
    assert main(["export", str(run), "--out", str(tmp_path / "served"), "--switchable"]) == 0
    assert main(["export", str(other), "--adapter-only", "--out", str(tmp_path / "other.onnx_adapter")]) == 0
    capsys.readouterr()
    code = main(["run", str(tmp_path / "served"), "--prompt", "x", "--adapter", str(tmp_path / "other.onnx_adapter")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "was made for another export" in err[-1]


def test_export_onnx_of_a_transformed_graph(tmp_path):
    import onnxruntime as ort

    model, kwargs = tiny("tiny-gpt2")
    gm = mf.transform(model, small_config("hydralora"), kwargs)
    randomize_adapters(gm, seed=4)
    with torch.no_grad():
        expected = gm(**kwargs).logits.numpy()
    out = mf.export_onnx(gm, tmp_path / "gm", kwargs)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {k: v.numpy() for k, v in kwargs.items()})
    assert np.abs(logits - expected).max() <= 1e-4
    assert not json.loads((out / "export.json").read_text())["kv_cache"]


def test_fp16_and_no_cache_exports(tmp_path):
    import onnxruntime as ort

    run = make_run(tmp_path / "run", "tiny-llama", "malora")
    gm, _ = load_run(str(run))
    ids = np.random.default_rng(5).integers(0, 258, size=(1, 6))
    with torch.no_grad():
        ref = gm(input_ids=torch.tensor(ids), attention_mask=torch.ones(1, 6, dtype=torch.long)).logits.numpy()

    half = OrtGenerator(export_run(run, tmp_path / "fp16", dtype="fp16"), "cpu")
    logits, past = half.step(ids, np.ones_like(ids), np.arange(6)[None], half.empty_past(1))
    assert logits.dtype == np.float16 and past["past_key_values.0.key"].dtype == np.float16
    assert np.abs(logits.astype(np.float32) - ref).max() <= 1e-2  # half precision

    out = export_run(run, tmp_path / "nocache", cache=False)
    meta = json.loads((out / "export.json").read_text())
    assert (meta["inputs"], meta["outputs"], meta["kv_cache"]) == (["input_ids", "attention_mask"], ["logits"], False)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (plain,) = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert np.abs(plain - ref).max() <= 1e-4


def test_weights_live_in_the_data_file(tmp_path):
    run = make_run(tmp_path / "run", "tiny-llama", "malora")
    out = export_run(run, tmp_path / "exp")
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    external = [i for i in graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    inline = [i for i in graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL]
    assert external and max(len(i.raw_data) for i in inline) <= 1024  # every weight lives in the data file
    files = {e.value for i in external for e in i.external_data if e.key == "location"}
    assert files == {"model.onnx.data"} and (out / "model.onnx.data").is_file()
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left behind
    gen = OrtGenerator(out, "cpu")
    gm, _ = load_run(str(run))
    ids = np.random.default_rng(6).integers(0, 258, size=(1, 5))
    with torch.no_grad():
        ref = gm(input_ids=torch.tensor(ids), attention_mask=torch.ones(1, 5, dtype=torch.long)).logits.numpy()
    assert np.abs(_logits(gen, ids) - ref).max() <= 1e-4


def test_lowering_and_fusion_node_counts(tmp_path):
    """11 ONNX nodes per routed site; fusion turns each layer's 9 + 6 + 3 projections into 3 GEMMs,
    and group_routing (which needs the fused GEMMs' shared logits) merges the spread and per-expert
    MatMuls of q/k/v (3 + 3 -> 1 + 1) and of gate/up (2 + 2 -> 1 + 1)."""
    six = "q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj"
    run = make_run(tmp_path / "run", "tiny-llama", "malora", targets=six)
    layers = tiny("tiny-llama")[0].config.num_hidden_layers
    graphs = {
        name: onnx.load(str(export_run(run, tmp_path / name, **options) / "model.onnx"))
        for name, options in [("base", {"base_only": True}), ("unfused", {"fuse": False}), ("fused", {})]
    }
    count = {name: len(g.graph.node) for name, g in graphs.items()}
    matmuls = {name: sum(n.op_type == "MatMul" for n in g.graph.node) for name, g in graphs.items()}
    assert count["unfused"] - count["base"] == 11 * 6 * layers
    assert matmuls["unfused"] - matmuls["fused"] == (8 + 5 + 2 + 4 + 2) * layers
    assert json.loads((tmp_path / "fused" / "export.json").read_text())["fused"] is True
    ids = np.random.default_rng(7).integers(0, 258, size=(2, 5))
    fused, unfused = (_logits(OrtGenerator(tmp_path / n, "cpu"), ids) for n in ("fused", "unfused"))
    assert np.abs(fused - unfused).max() <= 1e-5 * max(np.abs(unfused).max(), 1.0)


def test_cli_no_fuse_flag(tmp_path, capsys):
    run = make_run(tmp_path / "run", "tiny-llama", "malora")
    assert main(["export", str(run), "--out", str(tmp_path / "apart"), "--no-fuse"]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "fused")]) == 0
    fused = {name: json.loads((tmp_path / name / "export.json").read_text())["fused"] for name in ("apart", "fused")}
    assert fused == {"apart": False, "fused": True}
