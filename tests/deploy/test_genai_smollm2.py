"""onnxruntime-genai on the real SmolLM2-135M: og greedy tokens == ORT runner tokens == PyTorch greedy tokens.

For the base export and for a switchable export whose two adapter files are switched between two og
generators alive at the same time. (The lowered MALoRA export is checked in test_e2e_real_models.py.)
The PyTorch reference is an independent greedy loop over the eager model (full recompute, no cache).
"""

import pytest
import torch
from conftest import randomize_adapters

import malora_fx as mf
from malora_fx.adapters.run_dir import load_run
from malora_fx.deploy.adapter_file import export_adapter
from malora_fx.deploy.genai_runner import GenaiGenerator
from malora_fx.deploy.onnx_export import export_run
from malora_fx.deploy.runner import OrtGenerator
from malora_fx.training.data import format_prompt
from malora_fx.training.evaluate import stop_token_ids

pytestmark = pytest.mark.e2e
NEW = 24


@torch.no_grad()
def torch_greedy(forward, prompt, stops) -> list[int]:
    ids, out = list(prompt), []
    for _ in range(NEW):
        token = int(forward(torch.tensor([ids]))[0, -1].argmax())
        if token in stops:
            break
        out.append(token)
        ids.append(token)
    return out


def save_run(smollm2, path, seed: int):
    gm = mf.transform(smollm2.model, mf.MALoRAConfig(targets="q_proj,v_proj,up_proj", seed=seed))
    randomize_adapters(gm, std=0.1, seed=seed)  # large enough to change the greedy answer
    mf.save_adapters(gm, path, base_model="smollm2-135m")
    return path


def test_smollm2_base_and_switchable_exports_under_og(smollm2, tmp_path):
    tok = smollm2.tokenizer
    prompt = format_prompt(tok, "Name three colours of the rainbow.")
    stops = stop_token_ids(tok)
    run_a, run_b = save_run(smollm2, tmp_path / "a", seed=1), save_run(smollm2, tmp_path / "b", seed=2)

    base = export_run(run_a, tmp_path / "base", base_only=True)
    want_base = torch_greedy(lambda ids: smollm2.model(input_ids=ids).logits, prompt, stops)
    assert list(GenaiGenerator(base).generate(prompt, max_new_tokens=NEW, stop_ids=stops)) == want_base
    assert list(OrtGenerator(base, "cpu").generate(prompt, max_new_tokens=NEW, stop_ids=stops)) == want_base

    switchable = export_run(run_a, tmp_path / "switchable", switchable=True)
    files = [export_adapter(run, tmp_path / f"{run.name}.onnx_adapter") for run in (run_a, run_b)]
    wants = []
    for run in (run_a, run_b):
        gm, _ = load_run(str(run))
        wants.append(torch_greedy(lambda ids, gm=gm: gm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits,
                                  prompt, stops))  # fmt: skip
    assert want_base not in wants and wants[0] != wants[1]  # each adapter changes the answer, so a wrong switch shows
    gen = GenaiGenerator(switchable)
    streams = [gen.generate(prompt, max_new_tokens=NEW, stop_ids=stops, adapter=f) for f in files]
    got: list[list[int]] = [[], []]
    for pair in zip(*streams, strict=False):  # two og generators, different adapters, interleaved
        for i, token in enumerate(pair):
            got[i].append(token)
    for i, stream in enumerate(streams):
        got[i] += list(stream)
    assert got == wants
    ort = OrtGenerator(switchable, "cpu")
    assert [list(ort.generate(prompt, max_new_tokens=NEW, stop_ids=stops, adapter=f)) for f in files] == wants
