"""onnxruntime-genai on the real SmolLM2-135M: og greedy tokens == ORT runner tokens == PyTorch greedy tokens.

For the base export and for a switchable export whose two adapter files are switched between two og
generators alive at the same time. (The lowered MALoRA export is checked in test_e2e_real_models.py.)
The PyTorch reference is an independent greedy loop over the eager model (full recompute, no cache).
"""

import pytest
import torch
from conftest import randomize_adapters

import malora_fx as mf
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


def adapted_graph(smollm2):
    return mf.transform(smollm2.model, mf.MALoRAConfig(targets="q_proj,v_proj,up_proj"))


def save_run(gm, path, seed: int):
    """``gm``'s adapters randomised by ``seed`` and saved to ``path``."""
    randomize_adapters(gm, std=0.1, seed=seed)  # large enough to change the greedy answer
    mf.save_adapters(gm, path, base_model="smollm2-135m")
    return path


def base_greedy(smollm2, prompt, stops) -> list[int]:
    return torch_greedy(lambda ids: smollm2.model(input_ids=ids).logits, prompt, stops)


def test_smollm2_base_export_under_og(smollm2, tmp_path):
    tok = smollm2.tokenizer
    prompt = format_prompt(tok, "Name three colours of the rainbow.")
    stops = stop_token_ids(tok)
    base = export_run(save_run(adapted_graph(smollm2), tmp_path / "a", seed=1), tmp_path / "base", base_only=True)
    want_base = base_greedy(smollm2, prompt, stops)
    assert list(GenaiGenerator(base).generate(prompt, max_new_tokens=NEW, stop_ids=stops)) == want_base
    assert list(OrtGenerator(base, "cpu").generate(prompt, max_new_tokens=NEW, stop_ids=stops)) == want_base


def test_smollm2_switchable_export_under_og(smollm2, tmp_path):
    """A separate test from the base export's so that parallel workers (pytest -n) can share the two."""
    tok = smollm2.tokenizer
    prompt = format_prompt(tok, "Name three colours of the rainbow.")
    stops = stop_token_ids(tok)
    gm, runs, wants = adapted_graph(smollm2), [], []
    for seed in (1, 2):  # one graph, two adapter sets: the reference is the eager graph holding each set
        runs.append(save_run(gm, tmp_path / f"run{seed}", seed=seed))
        wants.append(torch_greedy(lambda ids: gm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits,
                                  prompt, stops))  # fmt: skip
    want_base = base_greedy(smollm2, prompt, stops)
    switchable = export_run(runs[0], tmp_path / "switchable", switchable=True)
    files = [export_adapter(run, tmp_path / f"{run.name}.onnx_adapter") for run in runs]
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
