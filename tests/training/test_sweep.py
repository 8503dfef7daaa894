"""``malora-fx sweep``: strict spec validation, cell enumeration, the validation split, a real 2-cell
smoke on tiny-llama (results.jsonl fields, the markdown report, plots), resume (finished cells
skipped, a killed cell rerun with the same numbers), the report's lr choice, and the command line."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest

from malora_fx.cli import main
from malora_fx.errors import MaloraError
from malora_fx.training.suites import make_suite
from malora_fx.training.sweep import (
    RESULTS,
    append_result,
    cells,
    load_spec,
    parse_shard,
    parse_spec,
    prepare_dir,
    read_results,
    run_sweep,
    shard_cells,
    suite_files,
    with_device,
)
from malora_fx.training.sweep_plan import Waiting, slots
from malora_fx.training.sweep_report import write_report
from malora_fx.training.sweep_spec import SuiteSpec, product

pytestmark = pytest.mark.filterwarnings("ignore")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "sweep"


def _spec(**changes) -> dict:
    spec = {
        "models": ["tiny-llama"],
        "suites": {"inter": {"train": 4, "eval": 2}},
        "methods": {"lora": {"method": "lora", "rank": 4}, "mal": {"method": "malora", "rank": 2, "shared_rank": 8}},
        "lrs": [1e-3],
        "steps": [4],
    }
    spec.update(changes)
    return spec


def _method(**fields) -> dict:
    return _spec(methods={"m": fields})


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (_spec(model=["tiny-llama"]), "unknown key 'model'; allowed: name, models,"),
        ({k: v for k, v in _spec().items() if k != "lrs"}, "missing key 'lrs'"),
        (_spec(models=[]), "models: [] is not allowed; expected a non-empty list"),
        (_spec(lrs=[1e-3, -1]), "lrs[1]: -1 is not allowed; expected a number > 0"),
        (_spec(seeds=[0, 0]), "seeds: [0, 0] is not allowed; expected a list without repeated values"),
        (_spec(seeds=["0"]), "seeds[0]: '0' is not allowed; expected an integer >= 0"),
        (_spec(steps=[0]), "steps[0]: 0 is not allowed; expected an integer >= 1"),
        (_spec(suites={"mixed": {}}), "suites: 'mixed' is not allowed; allowed suites: inter, intra"),
        (_spec(suites={"inter": {"train": 0}}), "suites.inter.train: 0 is not allowed; expected an integer >= 1"),
        (_spec(suites={"inter": {"test": 3}}), "unknown key 'suites.inter.test'; allowed: train, eval, validation"),
        (_method(method="dora"), "methods.m.method: 'dora' is not allowed; allowed: malora, molora, hydralora, lora"),
        (_method(rank=8), "methods.m: missing key 'method'"),
        (_method(method="lora", r=8), "unknown key 'methods.m.r'; allowed: method, experts, top_k, rank,"),
        (_method(method="molora", rank=0), "methods.m: rank: 0 is not allowed; expected an integer >= 1"),
        (_method(method="molora", experts=2, top_k=3), "methods.m: top_k: 3 is larger than experts=2"),
        (_method(method="lora", shared_rank=8), "methods.m: shared_rank: 8 given for method 'lora'"),
        (_method(method="molora", shared_rank_ratio=2.0), "methods.m.shared_rank_ratio: only used by method 'malora'"),
        (_method(method="molora", alpha="big"), "methods.m.alpha: 'big' is not allowed; expected a number"),
        (_method(method="molora", normalize_top_k=1), "methods.m.normalize_top_k: 1 is not allowed; expected true"),
        (_spec(ranks=[4, 8]), "methods.lora.rank: the top-level 'ranks' axis sets every method's rank; drop one"),
        (_spec(targets=""), "targets: '' has an empty name"),
        (_spec(train={"batch_size": 0}), "train.batch_size: 0 must be >= 1"),
        (_spec(train={"lr": 1e-3}), "unknown key 'train.lr'; allowed: batch_size,"),
        (_spec(train={"device": "tpu"}), "train.device: 'tpu'; allowed: cpu, cuda, cuda:N"),
        (_spec(eval={"max_new_tokens": 0}), "eval.max_new_tokens: 0 is not allowed; expected an integer >= 1"),
        ([1, 2], "spec.toml: expected a table of sweep settings, got list"),
        (_spec(lr_search_seeds=2), "lr_search_seeds: 2 is not allowed; expected an integer from 1 to 1"),
        (_spec(seeds=[0, 1], lr_search_seeds=0), "lr_search_seeds: 0 is not allowed; expected an integer from 1 to 2"),
        (_spec(seeds=[0, 1], lr_search_seeds=True), "lr_search_seeds: True is not allowed; expected an integer"),
        (
            _spec(seeds=[0, 1], lr_search_seeds=1),
            "lr_search_seeds: 1 is not allowed; the later seeds' lr is chosen on the validation split, "
            "and suite 'inter' has none (set suites.inter.validation)",
        ),
    ],
)
def test_spec_errors_name_the_key_the_value_and_what_is_allowed(spec, expected):
    with pytest.raises(MaloraError) as info:
        parse_spec(spec, "spec.toml")
    message = str(info.value)
    assert expected in message and message.startswith("spec.toml: ") and "\n" not in message


def test_spec_files_toml_json_and_bad_ones(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(_spec()))
    assert len(cells(load_spec(tmp_path / "s.json"))) == 2
    (tmp_path / "bad.toml").write_text("models = [tiny-llama]\n")
    (tmp_path / "s.yaml").write_text("models: []\n")
    (tmp_path / "bad.json").write_text("{")
    for name, expected in [
        ("bad.toml", "not valid TOML"),
        ("s.yaml", "unknown spec format '.yaml'; allowed: .toml, .json"),
        ("bad.json", "not valid JSON"),
        ("missing.toml", "no such spec file"),
    ]:
        with pytest.raises(MaloraError, match=expected):
            load_spec(tmp_path / name)


def test_cell_counts_and_settings_of_the_example_specs():
    paper_spec = load_spec(EXAMPLES / "paper_small.toml")
    paper = product(paper_spec)
    assert len(paper) == 2 * 3 * 6 * 3  # suites x seeds x methods x lrs
    assert len(cells(paper_spec)) == 2 * 1 * 6 * 3  # lr_search_seeds = 1: seed 0 runs every lr
    assert len(slots(paper_spec)) == 2 * 6 * (3 + 2)  # and seeds 1 and 2 wait for its choice
    assert len({c.id for c in paper}) == len(paper)
    by_name = {c.method_name: c.config for c in paper}
    assert (by_name["LoRA"].method, by_name["LoRA"].rank) == ("lora", 64)
    assert (by_name["MoLoRA-8x12"].num_experts, by_name["MoLoRA-8x12"].rank) == (8, 12)
    assert (by_name["MALoRA-Small"].rank, by_name["MALoRA-Small"].shared_rank) == (8, 22)
    assert by_name["HydraLoRA-8x8"].targets == ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
    assert {(c.seed, c.config.seed, c.train.seed) for c in paper} == {(s, s, s) for s in (0, 1, 2)}
    ranks = cells(load_spec(EXAMPLES / "rank_sweep.toml"))
    assert len(ranks) == 2 * 4 * 2
    malora = sorted({(c.config.rank, c.config.shared_rank) for c in ranks if c.config.method == "malora"})
    assert malora == [(4, 11), (8, 21), (16, 43), (32, 85)]
    assert len(cells(load_spec(EXAMPLES / "smoke.toml"))) == 2
    ablation = {
        c.method_name: c for c in cells(load_spec(EXAMPLES / "malora_ablation.toml")) if c.suite.name == "intra"
    }
    assert {
        name: (c.config.beta, c.config.normalize_top_k, c.config.aux_loss_coef, c.config.shared_rank)
        for name, c in ablation.items()
    } == {
        "MALoRA": (1.0, False, 0.01, 32),
        "MALoRA-beta1.25": (1.25, False, 0.01, 32),
        "MALoRA-renorm": (1.0, True, 0.01, 32),
        "MALoRA-noaux": (1.0, False, 0.0, 32),
        "MALoRA-d64": (1.0, False, 0.01, 64),
    }
    paper_malora = {c.id for c in paper if c.method_name == "MALoRA" and c.seed == 0 and c.train.lr == 1e-3}
    assert ablation["MALoRA"].id in paper_malora  # the baseline is paper_small's cell
    check = cells(load_spec(EXAMPLES / "intra_lr_check.toml"))
    assert len(check) == 2 * 2 * 3  # methods x lrs x seeds, every lr on every seed
    paper_intra = {c.id for c in paper if c.suite.name == "intra"}
    assert {c.id for c in check} <= paper_intra  # paper_small's cells, so its results count
    renorm = cells(load_spec(EXAMPLES / "intra_renorm_check.toml"))
    assert len(renorm) == 2 * 3 and all(c.config.normalize_top_k for c in renorm)
    assert ablation["MALoRA-renorm"].id in {c.id for c in renorm}  # the ablation's cell, so its result counts
    plain = {c.method_name: c for c in check if c.seed == 0 and c.train.lr == 1e-3}
    for c in renorm:  # each is its plain lr-check cell with only the renormalisation changed
        twin = plain[c.method_name.removesuffix("-renorm")]
        assert c.config == replace(twin.config, normalize_top_k=True, seed=c.seed)
        assert (c.train, c.suite) == (replace(twin.train, seed=c.seed), twin.suite)


def test_cell_ids_are_stable_and_cover_every_setting():
    first = [c.id for c in cells(parse_spec(_spec()))]
    reordered = dict(reversed(list(_spec().items())))
    assert [c.id for c in cells(parse_spec(reordered))] == first
    assert first[0].startswith("tiny-llama-inter-lora-r4-st4-lr0.001-seed0-")
    changed = [c.id for c in cells(parse_spec(_spec(train={"batch_size": 2})))]
    assert not set(changed) & set(first)


def test_validation_split_is_disjoint_and_eval_is_data_makes(tmp_path):
    suite = SuiteSpec("intra", train=6, eval=3, validation=2)
    paths = suite_files(tmp_path, suite, data_seed=5)
    splits = {k: [json.loads(line) for line in p.read_text().splitlines()] for k, p in paths.items()}
    assert {k: len(v) for k, v in splits.items()} == {"train": 30, "validation": 10, "eval": 15}
    prompts = [{e["prompt"] for e in v} for v in splits.values()]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    assert splits["eval"] == make_suite("intra", train=1, eval=3, seed=5)[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The 2-cell example sweep on tiny-llama, run once for the module (about 20 s on 2 cores)."""
    out = tmp_path_factory.mktemp("sweep") / "smoke"
    messages: list[str] = []
    began = time.perf_counter()
    rows = run_sweep(EXAMPLES / "smoke.toml", out, say=messages.append)
    return {"out": out, "rows": rows, "messages": messages, "seconds": time.perf_counter() - began}


def test_smoke_results_lines(smoke):
    rows = read_results(smoke["out"] / RESULTS)
    assert rows == smoke["rows"] and [r["method_name"] for r in rows] == ["lora", "malora"]
    tasks = {"arithmetic", "reverse", "sort", "weekday", "currency", "sentiment"}
    for r in rows:
        assert r["format"] == "malora-fx-sweep/1" and r["model"] == "tiny-llama" and r["suite"] == "inter"
        assert (r["seed"], r["lr"], r["steps"]) == (0, 1e-3, 4)
        assert set(r["eval"]["tasks"]) == tasks and set(r["validation"]["tasks"]) == tasks
        assert 0 <= r["eval"]["exact_match"] <= 1 and r["eval"]["loss"] > 0 and r["eval"]["n"] == 12
        assert r["base"]["eval"]["tasks"].keys() == tasks
        assert r["trainable_parameters"] > 0 and r["base_parameters"] == 107_072
        assert r["trainable_percent"] == pytest.approx(100 * r["trainable_parameters"] / 107_072)
        assert r["train_tokens_per_s"] > 0 and r["wall_seconds"] > 0
        assert set(r["versions"]) == {"python", "torch", "transformers", "malora_fx"}
        assert r["settings"]["config"]["seed"] == 0 and r["settings"]["train"]["seed"] == 0
        cell = smoke["out"] / "cells" / r["id"]
        assert json.loads((cell / "result.json").read_text()) == r
        assert json.loads((cell / "adapter_config.json").read_text())["base_model"] == "tiny-llama"
    assert rows[0]["trainable_parameters"] == 2 * 2 * 4 * (64 + 64) - 2 * 4 * 32  # q (64->64), v (64->32), 2 layers
    assert any("cell 2/2 done" in m and "0 left, ETA" in m for m in smoke["messages"]), smoke["messages"]
    print(f"smoke sweep: {smoke['seconds']:.1f} s")


def test_smoke_report(smoke):
    out = smoke["out"]
    text = (out / "results.md").read_text()
    assert "## Learning rate chosen on the validation split" in text
    assert "| tiny-llama | inter | base (no adapters) |" in text
    assert "| tiny-llama | inter | lora | 4 | 4 | 0.001 | 1 |" in text
    assert f"{smoke['rows'][1]['trainable_parameters']:,} | {smoke['rows'][1]['trainable_percent']:.2f} |" in text
    assert "![methods](methods.png)" in text and "rank_sweep" not in text
    assert (out / "methods.png").stat().st_size > 0 and (out / "params_vs_accuracy.png").stat().st_size > 0


def test_resume_skips_finished_cells_and_reruns_a_killed_one(smoke):
    out, rows = smoke["out"], smoke["rows"]
    messages: list[str] = []
    assert run_sweep(EXAMPLES / "smoke.toml", out, report=False, say=messages.append) == rows
    assert messages == ["2 cells, 2 already done, 0 to run"]
    # kill the second cell: its line half-written, its folder left as a partial .tmp
    killed = rows[1]["id"]
    lines = (out / RESULTS).read_text().splitlines(keepends=True)
    (out / RESULTS).write_text(lines[0] + lines[1][:40])
    shutil.move(out / "cells" / killed, out / "cells" / f"{killed}.tmp")
    (out / "cells" / f"{killed}.tmp" / "adapter_model.safetensors").write_bytes(b"partial")
    assert [r["id"] for r in read_results(out / RESULTS)] == [rows[0]["id"]]
    messages.clear()
    again = run_sweep(EXAMPLES / "smoke.toml", out, report=False, say=messages.append)
    assert f"removing the unfinished cell {killed}.tmp" in messages
    assert "2 cells, 1 already done, 1 to run" in messages
    assert [r["id"] for r in again] == [r["id"] for r in rows]
    assert len((out / RESULTS).read_text().splitlines()) == 2
    assert not list((out / "cells").glob("*.tmp"))
    for key in ("eval", "validation", "base", "final_train_loss", "trainable_parameters"):
        assert again[1][key] == rows[1][key], key  # the rerun reproduces the numbers


def _other_settings(row: dict, **train) -> dict:
    """``row`` as a cell with other train settings (and so another id)."""
    settings = json.loads(json.dumps(row["settings"]))
    settings["train"].update(train)
    return dict(row, settings=settings, id=f"{row['id']}-{'-'.join(map(str, train.values()))}")


def test_from_results_counts_another_copys_cells_as_finished(smoke, tmp_path, capsys):
    rows = smoke["rows"]
    # the smoke's lines (one twice), the first cell as run on a GPU, a cell the spec does not have and a
    # line without settings
    on_gpu, foreign = _other_settings(rows[0], device="cuda"), _other_settings(rows[0], lr=0.5)
    copy = tmp_path / "committed.jsonl"
    lines = [rows[0], foreign, rows[1], on_gpu, rows[0], {"id": "no-settings"}]
    copy.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "resumed"
    spec = str(EXAMPLES / "smoke.toml")
    assert main(["sweep", spec, "--out", str(out), "--from-results", str(copy), "--dry-run"]) == 0
    printed, err = capsys.readouterr()
    assert printed.splitlines()[-1] == "2 cells, 2 done, 0 to run"
    assert "3 finished cells taken from" in err and "2 rows of other cells left out" in err
    assert not out.exists()  # a dry run writes nothing
    assert main(["sweep", spec, "--out", str(out), "--from-results", str(copy), "--no-report"]) == 0
    assert "2 cells, 2 already done, 0 to run" in capsys.readouterr().err
    assert read_results(out / RESULTS) == [rows[0], rows[1], on_gpu] and (out / "spec.json").is_file()
    # again: nothing appended twice
    assert main(["sweep", spec, "--out", str(out), "--from-results", str(copy), "--no-report"]) == 0
    assert "0 finished cells taken from" in capsys.readouterr().err
    assert len(read_results(out / RESULTS)) == 3


def test_from_results_refuses_a_missing_file_and_one_of_another_spec(smoke, tmp_path, capsys):
    spec, out = str(EXAMPLES / "smoke.toml"), str(tmp_path / "out")
    assert main(["sweep", spec, "--out", out, "--from-results", str(tmp_path / "none.jsonl")]) == 2
    assert f"error: from-results: '{tmp_path / 'none.jsonl'}' is not a file" in capsys.readouterr().err
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(_other_settings(smoke["rows"][0], steps=5)) + "\n")
    assert main(["sweep", spec, "--out", out, "--from-results", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none of the 1 rows of" in err and "is a cell of" in err
    assert not (tmp_path / "out").exists()


def test_report_chooses_lr_on_validation_not_eval(tmp_path):
    def row(lr, seed, val, ev):
        scores = {"exact_match": ev, "loss": 1.0, "n": 2, "tasks": {"t": {"exact_match": ev, "loss": 1.0, "n": 2}}}
        return {
            "id": f"{lr}-{seed}",
            "model": "m",
            "suite": "inter",
            "method_name": "MALoRA",
            "method": "malora",
            "rank": 12,
            "steps": 10,
            "lr": lr,
            "seed": seed,
            "eval": scores,
            "validation": {**scores, "exact_match": val},
            "base": {"eval": {**scores, "exact_match": 0.0}},
            "trainable_parameters": 1000,
            "trainable_percent": 1.5,
            "train_tokens_per_s": 10.0,
            "versions": {"torch": "x"},
        }

    for r in [row(1e-3, 0, 0.5, 0.2), row(1e-3, 1, 0.7, 0.4), row(1e-2, 0, 0.1, 0.9), row(1e-2, 1, 0.1, 0.9)]:
        append_result(tmp_path / RESULTS, r)
    write_report(tmp_path)
    text = (tmp_path / "results.md").read_text()
    chosen = text.split("## Learning rate chosen")[1].split("## Per task")[0]
    assert (
        "| m | inter | MALoRA | 12 | 10 | 0.001 | 2 | 30.0 ± 14.1 | 1.000 ± 0.000 | 60.0 ± 14.1 | 1,000 | 1.50 "
        "| 0.001, 0.01 |" in chosen
    )
    assert "| 0.01 |" not in chosen and "| 0.01 | 2 | 90.0 ± 0.0 |" in text.split("## All cells")[1]


def test_read_results_refuses_a_damaged_middle_line(tmp_path):
    (tmp_path / RESULTS).write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(MaloraError, match=r"results.jsonl:2: not a JSON line"):
        read_results(tmp_path / RESULTS)


def test_cli_bad_spec_is_one_line_and_exit_2(tmp_path, capsys):
    spec = tmp_path / "bad.toml"
    spec.write_text(
        'models = ["tiny-llama"]\nlrs = [1e-3]\nsteps = [4]\nsuites.inter = {}\n[methods.x]\nmethod = "qlora"\n'
    )
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"malora-fx: error: {spec}: methods.x.method: 'qlora' is not allowed; allowed: malora,")
    assert not (tmp_path / "out").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file").write_text("")
    assert main(["sweep", str(EXAMPLES / "smoke.toml"), "--out", str(tmp_path / "other")]) == 2
    assert "--out: " in capsys.readouterr().err
    assert main(["sweep-report", str(tmp_path)]) == 2
    assert "no finished cells" in capsys.readouterr().err


def test_cli_dry_run_lists_cells(tmp_path, capsys):
    assert main(["sweep", str(EXAMPLES / "rank_sweep.toml"), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "16 cells, 0 done, 16 to run" and out[0].startswith("todo  smollm2-135m-inter-MoLoRA-r4-")
    assert not (tmp_path / "out").exists()


def test_shards_are_disjoint_cover_every_cell_and_each_starts_with_the_first_seed():
    every = product(load_spec(EXAMPLES / "paper_small.toml"))
    shards = [shard_cells(every, (i, 12)) for i in range(1, 13)]
    ids = [c.id for shard in shards for c in shard]
    assert len(ids) == len(every) == 108 and set(ids) == {c.id for c in every}
    assert all(len(s) == 9 for s in shards) and all(s[0].seed == 0 for s in shards)
    assert shard_cells(every, None) is every and shard_cells(every, (1, 1)) == every


@pytest.mark.parametrize("text", ["0/2", "3/2", "1/0", "a/b", "2", "1/2/3", ""])
def test_parse_shard_refuses(text):
    with pytest.raises(MaloraError, match=rf"^shard: {text!r}; expected I/N with 1 <= I <= N, e.g. 2/4$"):
        parse_shard(text)
    assert parse_shard(" 2 / 4 ") == (2, 4)


def test_with_device_is_a_train_setting_and_refuses_what_torch_cannot_use(monkeypatch):
    import torch

    spec = load_spec(EXAMPLES / "smoke.toml")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu = with_device(spec, "cuda:1")
    assert on_gpu.train["device"] == "cuda:1" and spec.train.get("device", "cpu") == "cpu"
    assert [c.train.device for c in cells(on_gpu)] == ["cuda:1", "cuda:1"]
    assert {c.id for c in cells(on_gpu)}.isdisjoint(c.id for c in cells(spec))
    with pytest.raises(MaloraError, match=r"^device: 'tpu'; allowed: cpu, cuda, cuda:N$"):
        with_device(spec, "tpu")
    with pytest.raises(MaloraError, match=r"^device: 'cuda:x'; allowed: cpu, cuda, cuda:N$"):
        with_device(spec, "cuda:x")  # TrainArgs' own check, the one every train path goes through
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MaloraError, match=r"^device: 'cuda': torch .* sees no CUDA device; allowed here: cpu$"):
        with_device(spec, "cuda")


def test_two_shards_share_one_directory(tmp_path):
    """Shard 1 runs while shard 2's cell is in progress (its .tmp folder): it is left alone; the two
    shards' lines land in one results.jsonl and the report covers both."""
    out, spec = tmp_path / "sweep", load_spec(EXAMPLES / "smoke.toml")
    first, second = (shard_cells(cells(spec), (i, 2))[0] for i in (1, 2))
    prepare_dir(out, spec, print)  # as shard 2 did when it started
    in_progress = out / "cells" / f"{second.id}.tmp"
    in_progress.mkdir(parents=True)
    messages: list[str] = []
    rows = run_sweep(spec, out, report=False, say=messages.append, shard=(1, 2))
    assert [r["id"] for r in rows] == [first.id] and in_progress.is_dir()
    assert "1 cells in shard 1/2, 0 already done, 1 to run" in messages
    shutil.rmtree(in_progress)  # as shard 2 would on its own restart
    rows = run_sweep(spec, out, report=False, say=messages.append, shard=(2, 2))
    assert [r["id"] for r in rows] == [first.id, second.id]
    assert "removing the unfinished cell" not in " ".join(messages)
    assert write_report(out) and "| lora | 4 | 4 |" in (out / "results.md").read_text()


def test_cli_shard_and_device_errors_exit_2(tmp_path, capsys):
    for flags, message in (
        (["--shard", "3/2"], "malora-fx: error: --shard: '3/2'; expected I/N with 1 <= I <= N, e.g. 2/4\n"),
        (["--device", "gpu"], "malora-fx: error: --device: 'gpu'; allowed: cpu, cuda, cuda:N\n"),
    ):
        assert main(["sweep", str(EXAMPLES / "smoke.toml"), "--out", str(tmp_path / "o"), *flags]) == 2
        assert capsys.readouterr().err == message
    assert not (tmp_path / "o").exists()
    assert (
        main(
            ["sweep", str(EXAMPLES / "rank_sweep.toml"), "--out", str(tmp_path / "o"), "--dry-run"] + ["--shard", "2/4"]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "4 cells, 0 done, 4 to run" and out[0].startswith("todo  smollm2-135m-inter-MALoRA-r4-")


def test_cli_jobs_runs_the_shards_in_processes_and_reports_once(tmp_path, capsys):
    out = tmp_path / "jobs"
    assert main(["sweep", str(EXAMPLES / "smoke.toml"), "--out", str(out), "--jobs", "2"]) == 0
    assert capsys.readouterr().out.endswith(f"2 finished cells in {out / RESULTS}\n")
    rows = read_results(out / RESULTS)
    assert sorted(r["method_name"] for r in rows) == ["lora", "malora"]
    assert {r["id"] for r in rows} == {c.id for c in cells(load_spec(EXAMPLES / "smoke.toml"))}
    assert (out / "results.md").is_file() and not list((out / "cells").glob("*.tmp"))
    for flags, message in (
        (["--jobs", "0"], "malora-fx: error: --jobs: 0; allowed: 1 or more\n"),
        (["--jobs", "2", "--shard", "1/2"], "malora-fx: error: --jobs and --shard: choose one"),
    ):
        assert main(["sweep", str(EXAMPLES / "smoke.toml"), "--out", str(tmp_path / "o"), *flags]) == 2
        assert capsys.readouterr().err.startswith(message)
    assert not (tmp_path / "o").exists()


def test_methods_run_leaves_other_methods_cells_in_progress_alone(tmp_path, capsys):
    out, spec = tmp_path / "sweep", load_spec(EXAMPLES / "smoke.toml")
    lora, malora = cells(spec)
    prepare_dir(out, spec, print)
    in_progress = out / "cells" / f"{malora.id}.tmp"  # a --methods malora run, working
    in_progress.mkdir(parents=True)
    assert main(["sweep", str(EXAMPLES / "smoke.toml"), "--out", str(out), "--methods", "lora", "--no-report"]) == 0
    assert [r["id"] for r in read_results(out / RESULTS)] == [lora.id] and in_progress.is_dir()
    assert "removing the unfinished cell" not in capsys.readouterr().err


def _searched(lr: float, seed: int, validation: float, loss: float = 1.0, device: str = "cpu", **spec) -> dict:
    """A results row for the cell of ``_lr_spec`` at ``lr`` and ``seed`` (as the sweep writes it), with
    these validation numbers; ``device`` is the device it ran on."""
    cell = next(c for c in product(_lr_spec(**spec)) if c.train.lr == lr and c.seed == seed)
    settings = cell.settings()
    settings["train"]["device"] = device
    scores = {"exact_match": validation, "loss": loss, "n": 2, "tasks": {}}
    return {"id": f"{cell.id}@{device}", "seed": seed, "lr": lr, "settings": settings, "validation": scores}


def _lr_spec(**changes):
    fields = {
        "seeds": [0, 1, 2],
        "lrs": [1e-3, 3e-4, 2e-3],
        "lr_search_seeds": 1,
        "suites": {"inter": {"train": 4, "eval": 2, "validation": 1}},
        "methods": {"lora": {"method": "lora", "rank": 4}},
    }
    return parse_spec(_spec(**{**fields, **changes}))


def test_later_seeds_wait_for_the_search_seeds_then_run_the_lr_with_the_best_validation():
    spec = _lr_spec()
    plan = slots(spec)
    assert [type(s).__name__ for s in plan] == ["Cell"] * 3 + ["Waiting"] * 2
    assert plan[3].name == "tiny-llama-inter-lora-r4-st4-lr?-seed1" and cells(spec) == plan[:3]
    rows = [_searched(1e-3, 0, 0.5), _searched(3e-4, 0, 0.75)]
    assert len(cells(spec, rows)) == 3  # 2e-3 has not run: no choice yet
    rows.append(_searched(2e-3, 0, 0.75, loss=0.5, device="cuda"))  # ties on EM, lower loss; ran on a GPU
    later = cells(spec, rows)[3:]
    assert [(c.seed, c.train.lr, c.train.device) for c in later] == [(1, 2e-3, "cpu"), (2, 2e-3, "cpu")]
    full = {(c.seed, c.train.lr): c.id for c in product(spec)}
    assert [c.id for c in later] == [full[(1, 2e-3)], full[(2, 2e-3)]]  # the full grid's cells at that lr
    other = _lr_spec(methods={"lora": {"method": "lora", "rank": 8}})  # another setting: these rows do not count
    assert all(isinstance(s, Waiting) for s in slots(other, rows)[3:])
    every_seed = _lr_spec(lr_search_seeds=3)
    assert slots(every_seed, rows) == product(every_seed)


def test_with_two_search_seeds_the_choice_waits_for_both_and_averages_them():
    spec = _lr_spec(lr_search_seeds=2)
    rows = [_searched(lr, 0, em) for lr, em in ((1e-3, 0.9), (3e-4, 0.1), (2e-3, 0.6))]
    assert isinstance(slots(spec, rows)[-1], Waiting)
    rows += [_searched(lr, 1, em) for lr, em in ((1e-3, 0.1), (3e-4, 0.2), (2e-3, 0.6))]
    assert [(c.seed, c.train.lr) for c in cells(spec, rows)[6:]] == [(2, 2e-3)]  # means 0.5, 0.15, 0.6


def test_report_compares_lrs_on_the_seeds_they_all_ran(tmp_path):
    def row(lr, seed, val):
        scores = {"exact_match": val, "loss": 1.0, "n": 2, "tasks": {"t": {"exact_match": val, "loss": 1.0, "n": 2}}}
        return {
            "id": f"{lr}-{seed}",
            **{"model": "m", "suite": "inter", "method_name": "LoRA", "method": "lora", "rank": 4, "steps": 10},
            **{"lr": lr, "seed": seed, "eval": scores, "validation": scores, "base": {"eval": scores}},
            **{"trainable_parameters": 10, "trainable_percent": 1.0, "train_tokens_per_s": 1.0, "versions": {}},
        }

    # seed 0 chose 1e-2; seeds 1 and 2 ran only there and did badly: 1e-2 stays the choice
    for r in [row(1e-3, 0, 0.5), row(1e-2, 0, 0.6), row(1e-2, 1, 0.1), row(1e-2, 2, 0.2)]:
        append_result(tmp_path / RESULTS, r)
    write_report(tmp_path)
    chosen = (tmp_path / "results.md").read_text().split("## Learning rate chosen")[1].split("## Per task")[0]
    assert "| m | inter | LoRA | 4 | 10 | 0.01 | 3 | 30.0 ± 26.5 |" in chosen and "| 0.001 |" not in chosen
    assert chosen.count("| 0.001, 0.01 |") == 1  # the lrs it was chosen from


def test_report_pairs_methods_on_the_seeds_both_ran(tmp_path):
    def row(method, rank, seed, em):
        scores = {"exact_match": em, "loss": 1.0, "n": 2, "tasks": {"t": {"exact_match": em, "loss": 1.0, "n": 2}}}
        return {
            "id": f"{method}-{rank}-{seed}",
            **{"model": "m", "suite": "inter", "method_name": method, "method": "lora", "rank": rank, "steps": 10},
            **{"lr": 1e-3, "seed": seed, "eval": scores, "base": {"eval": scores}},
            **{"trainable_parameters": 10, "trainable_percent": 1.0, "train_tokens_per_s": 1.0, "versions": {}},
        }

    # A beats B on each of seeds 0-2 by 10, 20, 30 points; A at rank 8 ran seed 0 only (no pair)
    a, b = [0.5, 0.6, 0.9], [0.4, 0.4, 0.6]
    rows = [row("A", 4, s, em) for s, em in enumerate(a)] + [row("B", 4, s, em) for s, em in enumerate(b)]
    for r in [*rows, row("A", 8, 0, 0.1), row("B", 4, 3, 0.0)]:  # B's seed 3 has no A to pair with
        append_result(tmp_path / RESULTS, r)
    write_report(tmp_path)
    paired = (tmp_path / "results.md").read_text().split("## Paired differences")[1].split("## Per task")[0]
    assert "| row − column | A r4 | A r8 | B |" in paired  # the rank named where a method has two
    assert "| A r4 | – |  | +20.0 ± 10.0 (3) |" in paired
    assert "| B | -20.0 ± 10.0 (3) |  | – |" in paired
    # a single seed each: no section at all
    single = tmp_path / "single"
    single.mkdir()
    for r in [rows[0], rows[3]]:
        append_result(single / RESULTS, r)
    write_report(single)
    assert "## Paired differences" not in (single / "results.md").read_text()


def _tiny_lr_search() -> dict:
    """Two lrs searched on seed 0, seed 1 after: 3 tiny-llama cells of a few seconds each."""
    return _spec(
        seeds=[0, 1],
        lrs=[1e-3, 5e-2],
        lr_search_seeds=1,
        steps=[3],
        targets="q_proj,v_proj",
        suites={"inter": {"train": 4, "eval": 1, "validation": 1}},
        methods={"lora": {"method": "lora", "rank": 4}},
        train={"batch_size": 4, "max_length": 96, "warmup_ratio": 0.0},
        eval={"max_new_tokens": 4},
    )


def test_run_with_lr_search_runs_the_later_seed_at_the_chosen_lr(tmp_path):
    """A real tiny sweep: 2 lrs on seed 0, then seed 1 at the one with the better validation numbers,
    in one run_sweep call; a second call has nothing left."""
    spec = parse_spec(_tiny_lr_search())
    messages: list[str] = []
    rows = run_sweep(spec, tmp_path / "s", report=False, say=messages.append)
    assert "3 cells, 0 already done, 2 to run, 1 waiting for the lr choice" in messages
    assert [(r["seed"], r["lr"]) for r in rows[:2]] == [(0, 1e-3), (0, 5e-2)] and rows[2]["seed"] == 1
    best = max(rows[:2], key=lambda r: (r["validation"]["exact_match"], -r["validation"]["loss"]))
    assert rows[2]["lr"] == best["lr"] and any("cell 3/3 done" in m and "0 left" in m for m in messages)
    messages.clear()
    assert run_sweep(spec, tmp_path / "s", report=False, say=messages.append) == rows
    assert messages[-1] == "3 cells, 3 already done, 0 to run"


def test_jobs_start_another_round_for_cells_whose_lr_a_shard_chose_late(tmp_path, monkeypatch):
    """Shard 1 (slots 1 and 3) finishes before shard 2 (slot 2, a search cell) has run: the later
    seed's cell in slot 3 waits, and the parent's second round runs it. The shards run in-process
    here, one after the other, in place of the processes."""
    import malora_fx.training.sweep_jobs as jobs

    data = _tiny_lr_search()
    (tmp_path / "spec.json").write_text(json.dumps(data))
    rounds: list[list[int]] = []

    def in_process(commands, env):
        ran = []
        for command in commands:
            index, count = parse_shard(command[command.index("--shard") + 1])
            before = len(read_results(tmp_path / "s" / RESULTS))
            run_sweep(tmp_path / "spec.json", tmp_path / "s", report=False, say=print, shard=(index, count))
            ran.append(len(read_results(tmp_path / "s" / RESULTS)) - before)
        rounds.append(ran)
        return [0] * len(commands)

    monkeypatch.setattr(jobs, "_run_round", in_process)
    rows = jobs.run_jobs(tmp_path / "spec.json", tmp_path / "s", 2, report=False, say=print)
    assert rounds == [[1, 1], [1, 0]] and sorted((r["seed"], r["lr"]) for r in rows)[:2] == [(0, 1e-3), (0, 5e-2)]
    assert len(rows) == 3 and rows[2]["seed"] == 1


def test_cli_dry_run_names_the_waiting_cells(tmp_path, capsys):
    assert main(["sweep", str(EXAMPLES / "paper_small.toml"), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "60 cells, 0 done, 36 to run, 24 waiting for the lr choice on the first seeds"
    assert "wait  smollm2-135m-inter-LoRA-r64-st300-lr?-seed1" in out


def test_seeds_runs_only_those_seeds_and_a_later_seed_without_its_search_waits(tmp_path, capsys):
    spec = _lr_spec(seeds=[0, 1], lrs=[1e-3, 5e-2])
    messages: list[str] = []
    assert run_sweep(spec, tmp_path / "s", say=messages.append, seeds=(1,)) == []
    assert messages[0] == "1 cells, 0 already done, 0 to run, 1 waiting for the lr choice"
    assert messages[1].startswith("1 cells wait for the lr choice (first: tiny-llama-inter-lora-r4-st4-lr?-seed1)")
    assert not (tmp_path / "s" / "cells").exists()  # nothing ran
    paper = str(EXAMPLES / "paper_small.toml")
    assert main(["sweep", paper, "--out", str(tmp_path / "o"), "--dry-run", "--seeds", "2, 1"]) == 0
    assert (
        capsys.readouterr().out.splitlines()[-1]
        == "24 cells, 0 done, 0 to run, 24 waiting for the lr choice on the first seeds"
    )
    assert main(["sweep", paper, "--out", str(tmp_path / "o"), "--dry-run", "--seeds", "0"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "36 cells, 0 done, 36 to run"
    for seeds in ("3", "1,x", ","):
        assert main(["sweep", paper, "--out", str(tmp_path / "o"), "--seeds", seeds]) == 2
        bad = seeds.split(",")[-1] if seeds != "," else ","
        assert (
            capsys.readouterr().err
            == f"malora-fx: error: --seeds: {bad!r} is not a seed of the spec; allowed: 0, 1, 2\n"
        )
    assert not (tmp_path / "o").exists()
