"""The command line: transform output, JSON summary, dry runs, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from malora_fx.adapters.accounting import site_parameters
from malora_fx.cli import main

EXAMPLE_7B = Path(__file__).resolve().parents[2] / "examples" / "llama-2-7b-config.json"
PAPER_TARGETS = "q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_transform_writes_adapter_files_and_table(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run(
        capsys,
        "transform",
        "tiny-llama",
        "--out",
        str(out_dir),
        "--targets",
        "q_proj,v_proj",
        "--rank",
        "4",
        "--shared-rank",
        "16",
    )
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["base_model"] == "tiny-llama" and config["rank"] == 4 and config["shared_rank"] == 16
    per_q = site_parameters("malora", 64, 64, num_experts=8, rank=4, shared_rank=16)
    per_v = site_parameters("malora", 64, 32, num_experts=8, rank=4, shared_rank=16)
    assert f"{per_q:,}" in out and f"{2 * (per_q + per_v):,}" in out
    assert "model.layers.1.self_attn.v_proj" in out and "% of 107,072 base parameters" in out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_json_summary(tmp_path, capsys):
    code, out, _ = run(
        capsys,
        "transform",
        "tiny-gpt2",
        "--dry-run",
        "--json",
        "--method",
        "molora",
        "--rank",
        "4",
        "--experts",
        "4",
        "--top-k",
        "1",
    )
    assert code == 0
    data = json.loads(out)
    assert data["method"] == "molora" and data["out"] is None
    assert len(data["sites"]) == 8
    expected = sum(
        site_parameters("molora", s["in_features"], s["out_features"], num_experts=4, rank=4) for s in data["sites"]
    )
    assert data["trainable_parameters"] == expected == data["methods"]["molora"]["trainable_parameters"]
    assert set(data["methods"]) == {"malora", "molora", "hydralora", "lora"}
    # each method at its own default rank (molora at the config's 4, lora at its 64), labelled per row
    assert {m: row["rank"] for m, row in data["methods"].items()} == {
        "malora": 12,
        "molora": 4,
        "hydralora": 8,
        "lora": 64,
    }
    assert data["methods"]["lora"]["trainable_parameters"] == sum(
        site_parameters("lora", s["in_features"], s["out_features"], num_experts=4, rank=64) for s in data["sites"]
    )
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, percent",
    [
        (["--method", "lora", "--rank", "64"], "2.12"),
        (["--method", "molora", "--rank", "8"], "2.24"),
        (["--method", "molora", "--rank", "12"], "3.31"),
        (["--method", "malora", "--rank", "12", "--shared-rank", "32"], "2.36"),
        (["--method", "malora", "--rank", "8", "--shared-rank", "22"], "1.62"),
    ],
)
def test_llama2_7b_dry_run_reproduces_paper_percentages(args, percent, capsys):
    code, out, err = run(capsys, "transform", str(EXAMPLE_7B), "--dry-run", "--json", "--targets", PAPER_TARGETS, *args)
    assert code == 0, err
    data = json.loads(out)
    assert data["base_parameters"] == 6_738_415_616
    assert len(data["sites"]) == 32 * 6
    assert f"{data['trainable_percent']:.2f}" == percent


BAD_INPUTS = [
    (["transform", "/no/such/model"], "model '/no/such/model' does not exist"),
    (["transform", "{text_file}"], "is not a model; expected a transformers directory"),
    (["transform", "tiny-llama", "--method", "moe"], "method: unknown method 'moe'"),
    (["transform", "tiny-llama", "--top-k", "9"], "--top-k: 9 is larger than --experts=8"),
    (["transform", "tiny-llama", "--rank", "0"], "rank: 0 is not allowed"),
    (["transform", "tiny-llama", "--rank", "-2"], "rank: -2 is not allowed"),
    (["transform", "tiny-llama", "--shared-rank", "100"], "--shared-rank: 100 is larger than in_features=64"),
    (["transform", "tiny-llama", "--targets", "query,key"], "match no linear module"),
    (["transform", "tiny-llama", "--experts", "two"], "argument --experts: invalid int value: 'two'"),
    (["transform", str(EXAMPLE_7B)], "is a bare config without weights; use it with --dry-run"),
]


def exit_code(argv):
    """main()'s return value, or the status argparse exits with."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("argv, message", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(argv, message, tmp_path, capsys):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a model")
    out_dir = tmp_path / "out"
    code = exit_code([a.format(text_file=text_file) for a in argv] + ["--out", str(out_dir)])
    _, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("malora-fx") and "error: " in lines[0], err
    assert message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_refuses_to_overwrite_a_non_empty_out_dir(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "transform", "tiny-llama", "--out", str(tmp_path))
    assert code == 2 and "exists and is not empty" in err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_console_script_exit_code():
    proc = subprocess.run(
        [sys.executable, "-m", "malora_fx.cli", "transform", "tiny-llama", "--top-k", "0"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "malora-fx: error: --top-k: 0 is not allowed; expected an integer >= 1"


@pytest.mark.parametrize(
    "command, config_class, skip",
    [(["transform"], "MALoRAConfig", ()), (["train", "RUN", "--data", "D"], "TrainArgs", ())],
)
def test_every_config_field_is_a_flag_with_its_default_and_help(command, config_class, skip):
    import dataclasses

    import malora_fx as mf
    from malora_fx.cli import build_parser
    from malora_fx.cli.flags import field_docs

    cls = getattr(mf, config_class)
    parser = build_parser()
    args = parser.parse_args(command)
    sub = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(command[0]))
    helps = {action.dest: action.help for action in sub._actions}
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        assert getattr(args, field.name) == field.default, field.name
        assert docs.get(field.name), f"{config_class}.{field.name} has no line in the Attributes: docstring"
        assert helps[field.name].startswith(docs[field.name].rstrip(".")), field.name


def test_flags_build_the_config_and_its_errors_apply(capsys):
    from malora_fx.cli import build_parser
    from malora_fx.cli.flags import dataclass_from_args
    from malora_fx.training.args import TrainArgs

    args = build_parser().parse_args(
        ["train", "RUN", "--data", "D", "--steps", "7", "--bf16", "--max-grad-norm", "0.5"]
    )
    targs = dataclass_from_args(TrainArgs, args)
    assert (targs.steps, targs.bf16, targs.max_grad_norm, targs.batch_size) == (7, True, 0.5, 8)
    code, _, err = run(capsys, "train", "RUN", "--data", "D", "--steps", "3", "--epochs", "1")
    assert code == 2 and err.strip() == "malora-fx: error: --steps and --epochs: give one of them, not both"
