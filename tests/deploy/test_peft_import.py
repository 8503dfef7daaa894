"""PEFT LoRA adapters go through malora-fx's merge / export path with PEFT's own outputs."""

import numpy as np
import peft  # noqa: E402  (a test dependency: the pyproject [test] extra)
import pytest
import torch

from malora_fx.adapters.run_dir import load_run
from malora_fx.cli import main
from malora_fx.deploy.onnx_export import export_run
from malora_fx.deploy.runner import OrtGenerator
from malora_fx.graph.tiny_models import tiny_model


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_lora_matches_peft_through_export(rslora, tmp_path, capsys):
    model = tiny_model("tiny-llama")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, use_rslora=rslora
    )
    peft_model = peft.get_peft_model(model, config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 258, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits.numpy()
        assert np.abs(expected - tiny_model("tiny-llama")(input_ids=ids).logits.numpy()).max() > 1e-3

    assert main(["import-peft", str(tmp_path / "peft"), "--base", "tiny-llama", "--out", str(tmp_path / "run")]) == 0
    assert "6 sites" in capsys.readouterr().out
    gm, _ = load_run(str(tmp_path / "run"))
    torch.testing.assert_close(
        gm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, torch.tensor(expected), atol=1e-5, rtol=0
    )
    gen = OrtGenerator(export_run(tmp_path / "run", tmp_path / "export"), "cpu")
    logits, _ = gen.step(ids.numpy(), np.ones((2, 7), np.int64), np.tile(np.arange(7), (2, 1)), gen.empty_past(2))
    assert np.abs(logits - expected).max() <= 1e-4


def test_not_a_peft_dir(tmp_path, capsys):
    assert main(["import-peft", str(tmp_path), "--base", "tiny-llama", "--out", str(tmp_path / "run")]) == 2
    assert "no PEFT adapter_config.json" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
