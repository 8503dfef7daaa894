"""The GroupQueryAttention fusion: every decoder family's attention fused, exact with left padding and a cache."""

import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from conftest import tiny
from onnx import helper
from transformers import AutoModelForCausalLM, Gemma3TextConfig, MistralConfig, Phi3Config, Qwen2Config

from malora_fx.deploy import onnx_passes
from malora_fx.deploy.onnx_export import export_decoder_graph
from malora_fx.deploy.onnx_passes import gqa_attention
from malora_fx.deploy.runner import OrtGenerator
from malora_fx.graph.cached_decoder import capture_decoder
from malora_fx.graph.tiny_models import tiny_tokenizer

PAD = 256
FAMILIES = {"qwen2": Qwen2Config, "mistral": MistralConfig, "phi3": Phi3Config, "gemma3_text": Gemma3TextConfig}


def _decoder(family: str):
    if family in ("llama", "gpt2"):
        return tiny(f"tiny-{family}")[0].eval()
    windows = {
        "mistral": {"sliding_window": None},
        "gemma3_text": {"layer_types": ["sliding_attention", "full_attention"]},
    }
    config = FAMILIES[family](
        **windows.get(family, {}),
        vocab_size=258,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=0,
        eos_token_id=257,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _export(model, out, **meta):
    gm, example = capture_decoder(model)
    return export_decoder_graph(gm, example, model.config, out, tokenizer=tiny_tokenizer(), **meta)


def _ops(out) -> list[tuple[str, str]]:
    return [(n.domain, n.op_type) for n in onnx.load(str(out / "model.onnx")).graph.node]


def _fed_by(out, op_types: tuple[str, ...], first: int) -> set[str]:
    """The op types producing the first ``first`` inputs of every node of ``op_types``."""
    graph = onnx.load(str(out / "model.onnx")).graph
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    return {made_by[i] for n in graph.node if n.op_type in op_types for i in n.input[:first] if i in made_by}


def _reference_next_logits(model, rows: list[list[int]]) -> np.ndarray:
    """Each row's last-position logits, run alone and unpadded (the independent reference)."""
    with torch.no_grad():
        return np.stack([model(input_ids=torch.tensor([r])).logits[0, -1].numpy() for r in rows])


def _left_padded(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    width = max(map(len, rows))
    ids = np.full((len(rows), width), PAD, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return ids, mask, np.clip(np.cumsum(mask, 1) - 1, 0, None)


def assert_left_padded_decode_matches(gen: OrtGenerator, model, steps: int = 3) -> None:
    """Two prompts of different lengths, left-padded in one batch: prefill and ``steps`` cached decode
    steps give each row's own PyTorch logits (1e-4 relative)."""
    rows = [list(np.random.default_rng(5).integers(0, 256, 9)), list(np.random.default_rng(6).integers(0, 256, 4))]
    ids, mask, positions = _left_padded(rows)
    logits, past = gen.step(ids, mask, positions, gen.empty_past(2))
    for _ in range(steps + 1):
        ref = _reference_next_logits(model, rows)
        assert np.abs(logits[:, -1] - ref).max() <= 1e-4 * np.abs(ref).max()
        nxt = ref.argmax(-1)
        rows = [r + [int(t)] for r, t in zip(rows, nxt, strict=True)]
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        positions = positions[:, -1:] + 1
        logits, past = gen.step(nxt[:, None], mask, positions, past)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "phi3", "gemma3_text", "gpt2"])
def test_every_layers_attention_becomes_one_gqa_node_with_the_same_logits(family, tmp_path):
    model = _decoder(family)
    out = _export(model, tmp_path / "exp")
    ops = _ops(out)
    windowed = getattr(model.config, "layer_types", None) or []
    fused = model.config.num_hidden_layers - windowed.count("sliding_attention")  # a windowed cache stays plain
    assert fused >= 1 and ops.count(("com.microsoft", "GroupQueryAttention")) == fused
    assert ops.count(("", "Softmax")) == model.config.num_hidden_layers - fused
    rotary = 0 if family == "gpt2" else 2 * model.config.num_hidden_layers  # queries and keys of every layer
    assert ops.count(("com.microsoft", "RotaryEmbedding")) == rotary and ("", "Neg") not in ops
    if family in ("llama", "qwen2", "mistral"):  # q, k, v go from their projections to the kernels unreshaped
        assert _fed_by(out, ("GroupQueryAttention", "RotaryEmbedding"), 3) <= {"MatMul", "Add", "RotaryEmbedding"}
    assert_left_padded_decode_matches(OrtGenerator(out, "cpu"), model)


def test_a_multi_token_step_after_a_past_in_a_batch(tmp_path):
    """Two rows, a 5-token past, then 3 tokens at once (onnxruntime needs ``query_seqlens`` for this)."""
    model = _decoder("llama")
    gen = OrtGenerator(_export(model, tmp_path / "exp"), "cpu")
    ids = np.random.default_rng(2).integers(0, 256, (2, 8))
    _, past = gen.step(ids[:, :5], np.ones((2, 5), np.int64), np.tile(np.arange(5), (2, 1)), gen.empty_past(2))
    logits, present = gen.step(ids[:, 5:], np.ones((2, 8), np.int64), np.tile(np.arange(5, 8), (2, 1)), past)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids)).logits[:, 5:].numpy()
    assert np.abs(logits - ref).max() <= 1e-4 * np.abs(ref).max()
    assert present["past_key_values.0.key"].shape == (2, 2, 8, 16)


def test_no_ort_fusions_keeps_the_plain_attention(tmp_path):
    model = _decoder("llama")
    out = _export(model, tmp_path / "exp", ort_fusions=False)
    ops = _ops(out)
    assert ("com.microsoft", "GroupQueryAttention") not in ops and ("", "Softmax") in ops
    assert_left_padded_decode_matches(OrtGenerator(out, "cpu"), model, steps=1)


def _plain_attention(slice_end: int) -> onnx.ModelProto:
    """One attention layer as torch.onnx writes it (heads 2, kv heads 1, head 8), keys sliced to ``slice_end``."""
    f, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    consts = {
        "zero": [0],
        "end": [slice_end],
        "axis2": [2],
        "one": [1],
        "rep": [1, 1, 2, 1, 1],
        "heads4": [0, 2, -1, 8],
        "flat": [0, 0, 16],
    }
    inits = [helper.make_tensor(k, i64, [len(v)], v) for k, v in consts.items()]
    inits.append(helper.make_tensor("c", f, [], [0.3]))  # scale 0.09, not the default 8**-0.5
    n = helper.make_node
    nodes = [
        n("Concat", ["past_key_values.0.key", "k"], ["present.0.key"], axis=-2),
        n("Concat", ["past_key_values.0.value", "v"], ["present.0.value"], axis=-2),
        n("Slice", ["present.0.key", "zero", "end", "axis2", "one"], ["ks"]),
        n("Unsqueeze", ["ks", "axis2"], ["ku"]),
        n("Expand", ["ku", "rep"], ["ke"]),
        n("Reshape", ["ke", "heads4"], ["kr"]),
        n("Transpose", ["kr"], ["kt"], perm=[0, 1, 3, 2]),
        n("Unsqueeze", ["present.0.value", "axis2"], ["vu"]),
        n("Expand", ["vu", "rep"], ["ve"]),
        n("Reshape", ["ve", "heads4"], ["vr"]),
        n("Mul", ["q", "c"], ["qs"]),
        n("Mul", ["kt", "c"], ["kts"]),
        n("MatMul", ["qs", "kts"], ["scores"]),
        n("Add", ["scores", "mask"], ["masked"]),
        n("Softmax", ["masked"], ["probs"], axis=-1),
        n("MatMul", ["probs", "vr"], ["heads"]),
        n("Transpose", ["heads"], ["bshd"], perm=[0, 2, 1, 3]),
        n("Reshape", ["bshd", "flat"], ["out"]),
    ]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "attention",
        [
            vi("attention_mask", i64, ["b", "t"]),
            vi("q", f, ["b", 2, "s", 8]),
            vi("k", f, ["b", 1, "s", 8]),
            vi("v", f, ["b", 1, "s", 8]),
            vi("past_key_values.0.key", f, ["b", 1, "p", 8]),
            vi("past_key_values.0.value", f, ["b", 1, "p", 8]),
            vi("mask", f, ["b", 1, "s", "t"]),
        ],
        [
            vi("out", f, ["b", "s", 16]),
            vi("present.0.key", f, ["b", 1, "t", 8]),
            vi("present.0.value", f, ["b", 1, "t", 8]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_a_hand_written_attention_is_fused_and_a_sliced_cache_is_not():
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    shapes = {"q": (1, 2, 3, 8), "k": (1, 1, 3, 8), "v": (1, 1, 3, 8)}
    shapes |= {f"past_key_values.0.{x}": (1, 1, 2, 8) for x in ("key", "value")}
    feeds = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    causal = np.triu(np.full((3, 5), -np.inf, np.float32), k=3)
    feeds |= {"mask": causal[None, None], "attention_mask": np.ones((1, 5), np.int64)}
    proto = _plain_attention(slice_end=2**62)
    want = ort.InferenceSession(proto.SerializeToString()).run(None, feeds)
    model = ir.serde.deserialize_model(proto)
    assert gqa_attention.fuse_group_query_attention(model).modified and model.meta["gqa_attention"] == 1
    assert [n.op_type for n in model.graph if n.domain == "com.microsoft"] == ["GroupQueryAttention"]
    got = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, feeds)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    sliced = ir.serde.deserialize_model(_plain_attention(slice_end=3))  # a window of the cache: not GQA
    assert not gqa_attention.fuse_group_query_attention(sliced).modified and sliced.meta["gqa_attention"] == 0


def test_an_onnxruntime_without_query_seqlens_leaves_attention_alone(monkeypatch, caplog):
    monkeypatch.setattr(gqa_attention, "onnxruntime_lacks_gqa", lambda: "onnxruntime 1.20's GQA has no query_seqlens")
    model = ir.serde.deserialize_model(_plain_attention(slice_end=2**62))
    with caplog.at_level(logging.WARNING):
        assert not gqa_attention.fuse_group_query_attention(model).modified
    assert "attention left unfused: onnxruntime 1.20's GQA has no query_seqlens" in caplog.text
    assert "GroupQueryAttention" not in {n.op_type for n in model.graph}


def test_the_installed_onnxruntime_runs_the_fused_node():
    assert gqa_attention.onnxruntime_lacks_gqa() is None
    assert "gqa_attention" in [name for name, _, contrib in onnx_passes.EXPORT_PASSES if contrib]
