"""``malora-fx verify`` / ``export --verify``: an export against its run's PyTorch model.

The reported numbers are checked against an independent comparison (onnxruntime's session and the
run's graph called here), and verify must fail where the export and the run really differ: another
run's adapters, a damaged weight."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from conftest import randomize_adapters, small_config, tiny

import malora_fx as mf
from malora_fx.adapters.run_dir import load_run
from malora_fx.cli import main
from malora_fx.deploy.onnx_export import export_run
from malora_fx.deploy.runner import OrtGenerator
from malora_fx.deploy.verify import TOLERANCES, Check, Verification, _compare, verify_export
from malora_fx.errors import MaloraError
from malora_fx.training.data import format_prompt


def make_run(path, name="tiny-llama", method="malora", seed=9):
    model, kwargs = tiny(name)
    gm = mf.transform(model, small_config(method), kwargs)
    randomize_adapters(gm, std=0.05, seed=seed)
    mf.save_adapters(gm, path, base_model=name)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    run = make_run(root / "run")
    return {"root": root, "run": run, "export": export_run(run, root / "export")}


def test_decoder_checks_match_an_independent_comparison(exported):
    result = verify_export(exported["export"], exported["run"], prompts=["abc", "a longer prompt"], steps=2)
    assert result.passed and result.kind == "decoder" and result.tolerance == TOLERANCES["fp32"] == 1e-4
    assert [(c.prompt, c.stage) for c in result.checks] == [
        (p, s) for p in (0, 1) for s in ("prefill", "decode 1", "decode 2")
    ]
    # the prefill of prompt 1, compared here without verify's code
    gen = OrtGenerator(exported["export"], "cpu")
    ids = np.asarray([format_prompt(gen.tokenizer, "a longer prompt")])
    logits, _ = gen.step(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], gen.empty_past(1))
    gm, _ = load_run(str(exported["run"]))
    with torch.no_grad():
        ref = gm(input_ids=torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids))).logits
    expected = float(np.abs(logits - ref.numpy()).max())
    assert result.checks[3].max_abs == pytest.approx(expected, rel=1e-6)
    assert result.checks[3].relative == pytest.approx(expected / float(ref.abs().max()), rel=1e-6)


def test_another_runs_adapters_fail(exported):
    other = make_run(exported["root"] / "other", seed=10)
    result = verify_export(exported["export"], other, steps=1)
    assert not result.passed and result.failures
    assert all(c.relative > 1e-4 for c in result.checks)
    assert result.table().splitlines()[-1].startswith(f"FAIL ({len(result.failures)} of {len(result.checks)} checks)")


def test_a_damaged_weight_fails_through_the_cli(exported, tmp_path, capsys):
    """One initializer of the data file scaled: exit status 1, the table says FAIL, the JSON records it."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(exported["export"], broken)
    model = onnx.load(str(broken / "model.onnx"))
    big = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    array = onnx.numpy_helper.to_array(big) * 1.5
    big.CopyFrom(onnx.numpy_helper.from_array(array, big.name))
    (broken / "model.onnx.data").unlink()
    onnx.save(model, str(broken / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    report = tmp_path / "verify.json"
    code = main(["verify", str(broken), "--run", str(exported["run"]), "--steps", "1", "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL (" in out.splitlines()[-1]
    data = json.loads(report.read_text())
    assert data["passed"] is False and len(data["checks"]) == 6 and data["provider"] == "CPUExecutionProvider"


@pytest.mark.parametrize(
    ("name", "options", "kind", "stages"),
    [
        ("tiny-llama", {"dtype": "fp16"}, "decoder", ["prefill", "decode 1"]),
        ("tiny-llama", {"cache": False}, "causal-lm", ["forward"]),
        ("tiny-llama", {"base_only": True}, "decoder", ["prefill", "decode 1"]),
        ("tiny-bert", {}, "encoder", ["forward"]),
    ],
)
def test_every_export_kind_passes_against_its_own_run(name, options, kind, stages, tmp_path):
    run = make_run(tmp_path / "run", name, "hydralora")
    out = export_run(run, tmp_path / "export", **options)
    result = verify_export(out, run, prompts=["hello"], steps=1)
    assert (result.kind, [c.stage for c in result.checks]) == (kind, stages)
    assert result.passed, result.table()
    assert result.tolerance == TOLERANCES[options.get("dtype", "fp32")]
    assert all((c.tokens_agree is None) == (kind == "encoder") for c in result.checks)  # hidden states: no tokens
    # base_only: the reference is the base model; compared with the adapted graph it would fail, as
    # test_another_runs_adapters_fail shows adapters of this size do


def test_genai_decodes_pytorchs_greedy_tokens(exported):
    result = verify_export(exported["export"], exported["run"], prompts=["abc"], steps=4, genai=True)
    assert [c.stage for c in result.checks][-1] == "genai" and result.passed, result.table()
    assert result.table().splitlines()[-2].split() == ["0", "genai", "–", "–", "same"]


def test_a_differing_token_is_shown_and_fails_only_beyond_the_tolerance_or_in_genai():
    ref = np.array([[0.0, 5.0, 5.0001, 1.0]], np.float32)  # tokens 1 and 2 nearly tie
    check = _compare(0, "decode 1", ref[:, [0, 2, 1, 3]], ref, tokens=True)
    assert not check.tokens_agree and check.detail == "token 1 vs 2, reference margin 1.00e-04"
    tied = Verification("e", "r", "decoder", "fp16", "CPUExecutionProvider", 2e-2, (check,))
    assert tied.passed and "differ  (token 1 vs 2" in tied.table()
    genai = Check(0, "genai", None, None, False, "genai [1] vs PyTorch [2]", tokens_required=True)
    assert not dataclasses.replace(tied, checks=(check, genai)).passed


def test_bad_requests_are_one_line_errors(exported, tmp_path, capsys):
    with pytest.raises(MaloraError, match=r"^steps: -1; allowed: 0 or more$"):
        verify_export(exported["export"], exported["run"], steps=-1)
    with pytest.raises(MaloraError, match=r"^run: '.*nowhere' is not a directory"):
        verify_export(exported["export"], tmp_path / "nowhere")
    nocache = export_run(exported["run"], tmp_path / "nocache", cache=False)
    with pytest.raises(MaloraError, match=r"^genai: onnxruntime-genai serves decoders exported with a KV cache only$"):
        verify_export(nocache, exported["run"], genai=True)
    for argv, message in [
        (["verify", str(tmp_path), "--run", str(exported["run"])], "(not a malora-fx export directory)"),
        (["verify", str(exported["export"]), "--run", str(exported["run"]), "--provider", "tpu"], "unknown provider"),
        (
            ["export", str(exported["run"]), "--out", str(tmp_path / "a.onnx_adapter"), "--adapter-only", "--verify"],
            "--verify)",
        ),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_export_verify_flag(exported, tmp_path, capsys):
    assert main(["export", str(exported["run"]), "--out", str(tmp_path / "exp"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("PASS: worst relative error") and "decode 3" in out
