"""Training behaviour of a transformed graph: gradients, frozen base, train/eval switch; ``train()`` on a
GraphModule held in Python (in place, files only with ``out_dir``, resume, argument errors)."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import METHODS, randomize_adapters, small_config, tiny
from safetensors.torch import load_file

import malora_fx as mf
from malora_fx.adapters.files import adapter_state_dict
from malora_fx.errors import MaloraError
from malora_fx.graph.tiny_models import tiny_tokenizer
from malora_fx.training.args import TrainArgs
from malora_fx.training.data import Example
from malora_fx.training.evaluate import task_losses
from malora_fx.training.logs import MetricsFile
from malora_fx.training.loop import train
from malora_fx.training.schedule import lr_factor, total_steps


def _lm_loss(gm, batch):
    logits = gm(**batch).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())


def test_gradients_reach_only_adapters_and_base_stays_bit_identical():
    model, batch = tiny("tiny-llama")
    for method in METHODS:
        gm = mf.transform(model, small_config(method), batch)
        randomize_adapters(gm, std=0.02)
        trainable = mf.trainable_parameters(gm)
        trainable_ids = {id(p) for p in trainable}
        base = {name: p.detach().clone() for name, p in gm.named_parameters() if id(p) not in trainable_ids}
        assert base and trainable
        assert all(not p.requires_grad for n, p in gm.named_parameters() if id(p) not in trainable_ids)
        adapters_before = [p.detach().clone() for p in trainable]
        opt = torch.optim.AdamW(trainable, lr=1e-2)
        for _ in range(3):
            loss = _lm_loss(gm, batch) + 0.01 * mf.aux_loss(gm, batch["attention_mask"])
            loss.backward()
            assert all(p.grad is None for n, p in gm.named_parameters() if id(p) not in trainable_ids)
            assert all(p.grad is not None for p in trainable)
            opt.step()
            opt.zero_grad()
        for name, p in gm.named_parameters():
            if id(p) not in trainable_ids:
                assert torch.equal(p, base[name]), name
        assert all(not torch.equal(a, p) for a, p in zip(adapters_before, trainable, strict=True))


def test_trainable_parameter_count_matches_formulas():
    model, batch = tiny("tiny-gpt2")
    from malora_fx.adapters.accounting import count_sites
    from malora_fx.passes import STATE_KEY

    for method in METHODS:
        gm = mf.transform(model, small_config(method), batch)
        expected = sum(c.parameters for c in count_sites(mf.get_config(gm), gm.meta[STATE_KEY]["sites"]))
        assert sum(p.numel() for p in mf.trainable_parameters(gm)) == expected


def test_set_adapters_training_switches_dropout():
    model, batch = tiny("tiny-llama")
    gm = mf.transform(model, small_config("malora", dropout=0.5), batch)
    randomize_adapters(gm)
    assert all(layer.training for layer in mf.adapter_layers(gm).values())
    mf.set_adapters_training(gm, False)
    assert not any(layer.training for layer in mf.adapter_layers(gm).values())
    assert torch.equal(gm(**batch).logits, gm(**batch).logits)
    mf.set_adapters_training(gm, True)
    torch.manual_seed(0)
    first = gm(**batch).logits
    torch.manual_seed(1)
    assert not torch.equal(first, gm(**batch).logits)


def test_aux_loss_ignores_padding_tokens():
    model, batch = tiny("tiny-llama")
    gm = mf.transform(model, small_config("malora"), batch)
    randomize_adapters(gm, std=0.2)
    ids = batch["input_ids"][:, :6]
    gm(input_ids=ids, attention_mask=torch.ones_like(ids))
    plain = mf.aux_loss(gm, torch.ones_like(ids))
    padded = torch.cat([ids, torch.full((2, 3), 5)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(2, 3, dtype=torch.long)], dim=1)
    gm(input_ids=padded, attention_mask=mask)
    torch.testing.assert_close(mf.aux_loss(gm, mask), plain, atol=1e-6, rtol=1e-6)
    assert abs(mf.aux_loss(gm).item() - plain.item()) > 1e-4  # unmasked, padding would count


# ---------------------------------------------------------------- train() on a GraphModule held in Python

PAIRS = [("copy", "abc", "abc"), ("copy", "xyz", "xyz"), ("upper", "abc", "ABC"), ("upper", "qrs", "QRS")]


def _examples(repeat=1):
    return [Example(t, (("user", p), ("assistant", r))) for t, p, r in PAIRS] * repeat


def _write_jsonl(path, repeat=1):
    path.write_text("".join(json.dumps({"task": t, "prompt": p, "response": r}) + "\n" for t, p, r in PAIRS * repeat))
    return path


def _adapted(method="malora", **changes):
    return mf.transform(mf.load_model("tiny-llama").model, small_config(method, **changes))


def _state(gm):
    return {k: v.clone() for k, v in adapter_state_dict(gm).items()}


def test_train_graph_module_in_place_changes_adapters_and_lowers_loss(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written without out_dir
    gm, tok = _adapted(), tiny_tokenizer()
    trainable = {id(p) for p in mf.trainable_parameters(gm)}
    base = {n: p.detach().clone() for n, p in gm.named_parameters() if id(p) not in trainable}
    adapters = _state(gm)
    data = _examples(repeat=4)

    def mean_loss():
        mf.set_adapters_training(gm, False)
        losses = task_losses(lambda i, m: gm(input_ids=i, attention_mask=m).logits, tok, data, 64, 8)
        mf.set_adapters_training(gm, True)
        return sum(v["loss"] for v in losses.values()) / len(losses)

    before = mean_loss()
    result = train(
        gm,
        data,
        TrainArgs(steps=25, batch_size=4, lr=1e-2, warmup_ratio=0.0),
        tokenizer=tok,
        progress=False,
        say=lambda m: None,
    )
    assert result.gm is gm and result.run_dir is None and result.steps == 25
    assert [r["step"] for r in result.metrics] == list(range(1, 26))
    assert result.final_loss == result.metrics[-1]["loss"]
    # tok/s counts every token read; response_tokens only those the loss covers (prompt excluded)
    for row in result.metrics:
        assert 0 < row["response_tokens"] < row["tokens"], row
        assert row["response_tokens_per_s"] < row["tokens_per_s"]
    after = mean_loss()
    assert after < before - 0.5, (before, after)  # ln(258) ≈ 5.55 at init; about 4.5 after
    assert result.metrics[-1]["loss"] < result.metrics[0]["loss"]
    changed = _state(gm)
    assert all(not torch.equal(adapters[k], changed[k]) for k in adapters if k.endswith((".B", ".router")))
    assert all(torch.equal(p, base[n]) for n, p in gm.named_parameters() if id(p) not in trainable)
    assert list(tmp_path.iterdir()) == []


def test_graph_module_from_path_or_examples_and_out_dir_files(tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", repeat=2)
    args = TrainArgs(steps=4, batch_size=4, lr=5e-3, seed=2, save_every=2, keep=1)
    first, second = _adapted(dropout=0.1), _adapted(dropout=0.1)
    out = tmp_path / "out"
    result = train(
        first,
        data,
        args,
        tokenizer=tiny_tokenizer(),
        out_dir=out,
        eval_data=_examples(),
        progress=False,
        say=lambda m: None,
    )
    train(
        second,
        _examples(repeat=2),
        args,
        tokenizer=tiny_tokenizer(),
        out_dir=tmp_path / "out2",
        progress=False,
        say=lambda m: None,
    )
    a, b = _state(first), _state(second)
    assert all(torch.equal(a[k], b[k]) for k in a)  # a path and its examples train alike
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert saved.keys() == a.keys() and all(torch.equal(saved[k], a[k]) for k in a)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 4] and set(rows[-1]["eval_loss"]) == {"copy", "upper"}
    assert rows == json.loads(json.dumps(result.metrics))
    assert (out / "loss.png").stat().st_size > 1000
    assert mf.read_adapter_config(out)["method"] == "malora"


def test_graph_module_resume_from_out_dir_is_bit_identical(tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", repeat=2)
    args = TrainArgs(steps=6, batch_size=4, lr=5e-3, seed=3, save_every=3, keep=2)
    reference = _adapted(dropout=0.1)
    train(
        reference, data, args, tokenizer=tiny_tokenizer(), out_dir=tmp_path / "ref", progress=False, say=lambda m: None
    )
    interrupted = tmp_path / "cut"  # as if killed after the step-3 checkpoint
    shutil.copytree(tmp_path / "ref" / "checkpoints" / "step-00000003", interrupted / "checkpoints" / "step-00000003")
    lines = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    (interrupted / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n")  # one row past the checkpoint
    said = []
    resumed = train(
        _adapted(dropout=0.1),
        data,
        TrainArgs(**{**args.__dict__, "resume": True}),
        tokenizer=tiny_tokenizer(),
        out_dir=interrupted,
        progress=False,
        say=said.append,
    )
    assert any("resuming from step-00000003" in m for m in said)
    ref, got = _state(reference), _state(resumed.gm)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert [r["step"] for r in resumed.metrics] == list(range(1, 7))
    with pytest.raises(MaloraError, match="other data or settings"):
        train(
            _adapted(dropout=0.1),
            _examples(),
            TrainArgs(**{**args.__dict__, "resume": True}),
            tokenizer=tiny_tokenizer(),
            out_dir=interrupted,
            progress=False,
            say=lambda m: None,
        )


@pytest.mark.parametrize(
    "kwargs, args, message",
    [
        ({}, TrainArgs(steps=1), "tokenizer: required"),
        ({"tokenizer": "tok"}, TrainArgs(steps=1, save_every=1), "out_dir: save_every=1 needs out_dir"),
        ({"tokenizer": "tok"}, TrainArgs(steps=1, resume=True), "out_dir: resume=True needs out_dir"),
    ],
)
def test_graph_module_argument_errors_name_the_parameter(kwargs, args, message):
    gm = _adapted()
    before = _state(gm)
    kwargs = {k: tiny_tokenizer() if v == "tok" else v for k, v in kwargs.items()}
    with pytest.raises(MaloraError, match=message):
        train(gm, _examples(), args, progress=False, say=lambda m: None, **kwargs)
    after = _state(gm)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_other_targets_and_data_are_refused(tmp_path):
    model, batch = tiny("tiny-llama")
    plain = mf.capture(model, batch)
    with pytest.raises(MaloraError, match="target: this GraphModule has no malora-fx adapters"):
        train(plain, _examples(), TrainArgs(steps=1), tokenizer=tiny_tokenizer())
    with pytest.raises(MaloraError, match="target: expected a run directory or an adapted GraphModule"):
        train(model, _examples(), TrainArgs(steps=1), tokenizer=tiny_tokenizer())
    with pytest.raises(MaloraError, match="data: expected a JSONL path or a non-empty list"):
        train(_adapted(), [], TrainArgs(steps=1), tokenizer=tiny_tokenizer())
    run = mf.save_adapters(_adapted(), tmp_path / "run", base_model="tiny-llama")
    with pytest.raises(MaloraError, match="tokenizer: a run directory uses its base model's tokenizer"):
        train(run, _examples(), TrainArgs(steps=1), tokenizer=tiny_tokenizer())
    with pytest.raises(MaloraError, match="out_dir: a run directory is written in place"):
        train(run, _examples(), TrainArgs(steps=1), out_dir=tmp_path / "elsewhere")
    assert sorted(p.name for p in run.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_schedule_and_metrics_file(tmp_path):
    assert [round(lr_factor(s, 10, 2), 6) for s in (0, 1, 2, 10)] == [0.5, 1.0, 1.0, 0.0]
    assert total_steps(TrainArgs(steps=7), 1000) == 7
    assert total_steps(TrainArgs(batch_size=4, grad_accum=2), 17) == 3  # one epoch by default
    assert total_steps(TrainArgs(epochs=0.1, batch_size=8), 10) == 1
    log = MetricsFile(tmp_path / "metrics.jsonl")
    assert log.until(3, rewrite=True) == [] and not log.path.exists()
    for step in (1, 2, 3, 4):
        log.append({"step": step, "loss": float(step)})
    assert [r["step"] for r in log.until(2, rewrite=False)] == [1, 2]
    assert len(log.path.read_text().splitlines()) == 4
    assert [r["step"] for r in log.until(2, rewrite=True)] == [1, 2]
    assert len(log.path.read_text().splitlines()) == 2


def test_loss_plot_has_one_legend_for_both_curves(tmp_path, monkeypatch):
    """Two legends (one per axis) used to overlap; one combined legend names both curves."""
    import matplotlib.figure

    from malora_fx.training.logs import plot_losses

    seen = []
    original = matplotlib.figure.Figure.savefig

    def capture(fig, *args, **kwargs):
        seen.append(fig)
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    rows = [{"step": i, "loss": 5.0 - 0.1 * i, "aux_loss": 1.0 + 0.01 * i} for i in range(1, 6)]
    plot_losses(rows, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").is_file() and len(seen) == 1
    legends = [ax.get_legend() for ax in seen[0].axes if ax.get_legend() is not None]
    assert len(legends) == 1
    assert [t.get_text() for t in legends[0].get_texts()] == ["LM loss (response tokens)", "load-balancing loss"]
