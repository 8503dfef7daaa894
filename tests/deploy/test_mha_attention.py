"""The MultiHeadAttention fusion: attention without a KV cache (encoders, --no-cache decoders) against PyTorch."""

import numpy as np
import onnx
import onnxruntime as ort
import torch
from conftest import tiny
from test_onnx_export import make_run

from malora_fx.adapters.run_dir import load_run
from malora_fx.deploy.onnx_export import export_run


def _ops(out) -> list[tuple[str, str]]:
    return [(n.domain, n.op_type) for n in onnx.load(str(out / "model.onnx")).graph.node]


def _session(out):
    return ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])


def test_encoder_attention_becomes_multi_head_attention_with_padding(tmp_path):
    run = make_run(tmp_path / "run", "tiny-bert", "malora")
    out = export_run(run, tmp_path / "exp")
    gm, _ = load_run(str(run))
    assert _ops(out).count(("com.microsoft", "MultiHeadAttention")) == tiny("tiny-bert")[0].config.num_hidden_layers
    ids = np.random.default_rng(1).integers(0, 258, size=(3, 9))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    (hidden,) = _session(out).run(["last_hidden_state"], feeds)
    with torch.no_grad():
        ref = gm(**{k: torch.tensor(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    real = mask.astype(bool)
    assert np.abs(hidden - ref)[real].max() <= 1e-4 * np.abs(ref[real]).max()


def test_a_decoder_without_cache_gets_causal_multi_head_attention(tmp_path):
    run = make_run(tmp_path / "run", "tiny-gpt2", "lora")
    out = export_run(run, tmp_path / "exp", cache=False)
    assert _ops(out).count(("com.microsoft", "MultiHeadAttention")) == tiny("tiny-gpt2")[0].config.num_hidden_layers
    ids = np.random.default_rng(2).integers(0, 258, size=(2, 8))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    session = _session(out)
    feeds = {i.name: {"input_ids": ids, "attention_mask": mask}[i.name] for i in session.get_inputs()}
    logits = session.run(["logits"], feeds)[0]
    gm, _ = load_run(str(run))
    with torch.no_grad():
        ref = gm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    real = mask.astype(bool)
    assert np.abs(logits - ref)[real].max() <= 1e-4 * np.abs(ref[real]).max()


def test_grouped_heads_and_float16_stay_plain_without_cache(tmp_path):
    """Kv heads repeated (tiny-llama: 4 heads, 2 kv heads) is not this pass's shape; CPU has no fp16 kernel."""
    run = make_run(tmp_path / "run", "tiny-llama", "malora")
    grouped = _ops(export_run(run, tmp_path / "grouped", cache=False))
    half = _ops(
        export_run(make_run(tmp_path / "gpt2", "tiny-gpt2", "lora"), tmp_path / "half", cache=False, dtype="fp16")
    )
    for ops in (grouped, half):
        assert ("com.microsoft", "MultiHeadAttention") not in ops and ("", "Softmax") in ops
