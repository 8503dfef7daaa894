"""Bad input everywhere: every command and the public API refuse it in one line, write nothing.

One table of cases over the command line (each: one ``malora-fx: error:`` line naming the bad
value and what is allowed, exit status 2, no new file and no ``.tmp`` leftover next to the
output) and one over the Python API (a :class:`MaloraError` naming the Python parameter, never
a flag). The shared fixtures (a tiny-llama run directory, its export, a data suite) are built
once per module; the export is made through the console script in a subprocess, which also
checks that the command line's output is quiet (no third-party warnings without ``-v``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

import malora_fx as mf
from malora_fx.cli import main
from malora_fx.errors import MaloraError

pytestmark = pytest.mark.filterwarnings("ignore")
QUIET_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "malora_fx.cli", *argv], capture_output=True, text=True, env=QUIET_ENV, check=False
    )


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path | str]:
    root = tmp_path_factory.mktemp("bad-input")
    run, exp = root / "run", root / "exp"
    made = _cli("transform", "tiny-llama", "--out", str(run), "--targets", "q_proj,v_proj", "--experts", "2",
                "--top-k", "1", "--rank", "2", "--shared-rank", "4")  # fmt: skip
    assert made.returncode == 0, made.stderr
    exported = _cli("export", str(run), "--out", str(exp))
    assert exported.returncode == 0, exported.stderr
    mf.write_suite("inter", root / "data", train=2, eval=1, seed=0)
    return {"root": root, "run": run, "exp": exp, "data": root / "data", "stderr": made.stderr + exported.stderr}


def test_cli_output_is_quiet_without_v(ws):
    """transform + export through the console script: only malora-fx's own lines on stderr.

    Before the fix this printed four ``torchvision is not installed`` warnings, a
    ``FutureWarning`` from copyreg about ``LeafSpec`` and its ``return cls.__new__`` line."""
    noisy = [
        line
        for line in str(ws["stderr"]).splitlines()
        if line.strip() and ("Warning" in line or "torchvision" in line or not line.startswith("malora-fx"))
    ]
    assert not noisy, noisy


# --- fixtures for the table: each builds the bad input inside `tmp` (the case's own folder) ---------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def run_with(ws, tmp, fix) -> str:
    run = _copy(ws["run"], tmp / "in" / "run")
    fix(run)
    return str(run)


def exp_with(ws, tmp, fix) -> str:
    exp = _copy(ws["exp"], tmp / "in" / "exp")
    fix(exp)
    return str(exp)


def write(tmp, name: str, content: bytes | str) -> str:
    path = tmp / "in" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def train_jsonl(ws) -> str:
    return str(ws["data"] / "train.jsonl")


def _nonempty(tmp) -> str:
    out = tmp / "in" / "full"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    return str(out)


def _peft(tmp, config: dict, weights: bytes | None) -> str:
    d = tmp / "in" / "peft"
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps(config))
    if weights is not None:
        (d / "adapter_model.safetensors").write_bytes(weights)
    return str(d)


CFG = "adapter_config.json"
ST = "adapter_model.safetensors"
# (id, argv(ws, tmp) -> list[str], substrings the error line must hold)
CLI_CASES = [
    # transform: model sources
    (
        "transform-missing-model",
        lambda w, t: ["transform", str(t / "nope"), "--out", str(t / "o")],
        ["does not exist", "expected a transformers directory"],
    ),
    (
        "transform-empty-dir",
        lambda w, t: ["transform", write(t, "d/.keep", "")[:-6], "--out", str(t / "o")],
        ["directory has no config.json", "expected a transformers directory"],
    ),
    (
        "transform-no-weights",
        lambda w, t: ["transform", write(t, "m/config.json", "{not json")[:-12], "--out", str(t / "o")],
        ["no *.safetensors weights"],
    ),
    (
        "transform-truncated-safetensors",
        lambda w, t: [
            "transform",
            (write(t, "m/config.json", '{"model_type": "llama"}'), write(t, "m/model.safetensors", b"\x10\x00\x00"))[0][
                :-12
            ],
            "--out",
            str(t / "o"),
        ],
        ["transformers could not load it", "header"],
    ),
    (
        "transform-empty-gguf",
        lambda w, t: ["transform", write(t, "m.gguf", b""), "--out", str(t / "o")],
        ["m.gguf' is not a GGUF file"],
    ),
    # transform: options
    (
        "transform-shared-rank-with-lora",
        lambda w, t: ["transform", "tiny-llama", "--method", "lora", "--shared-rank", "8", "--dry-run"],
        ["--shared-rank: 8 given for method 'lora'", "only used by method 'malora'"],
    ),
    (
        "transform-unknown-method",
        lambda w, t: ["transform", "tiny-llama", "--method", "moe", "--dry-run"],
        ["--method: unknown method 'moe'; allowed: malora, molora, hydralora, lora"],
    ),
    (
        "transform-top-k-above-experts",
        lambda w, t: ["transform", "tiny-llama", "--top-k", "9", "--dry-run"],
        ["--top-k: 9 is larger than --experts=8; allowed: 1..8"],
    ),
    (
        "transform-dropout-out-of-range",
        lambda w, t: ["transform", "tiny-llama", "--dropout", "1.5", "--dry-run"],
        ["--dropout: 1.5 is out of range; allowed: 0 <= dropout < 1"],
    ),
    (
        "transform-bad-regex",
        lambda w, t: ["transform", "tiny-llama", "--targets", "re:[", "--dry-run"],
        ["--targets: invalid regular expression '['"],
    ),
    ("transform-no-out", lambda w, t: ["transform", "tiny-llama"], ["--out DIR is required (or pass --dry-run)"]),
    (
        "quickstart-nonempty-out",
        lambda w, t: ["quickstart", "--model", "tiny-llama", "--out", _nonempty(t)],
        ["is not empty and holds no earlier quickstart", "--overwrite"],
    ),
    (
        "quickstart-out-is-a-file",
        lambda w, t: ["quickstart", "--model", "tiny-llama", "--out", write(t, "f.txt", "x")],
        ["exists and is not a directory"],
    ),
    (
        "transform-non-empty-out",
        lambda w, t: ["transform", "tiny-llama", "--out", _nonempty(t)],
        ["exists and is not empty", "--overwrite"],
    ),
    (
        "transform-out-under-a-file",
        lambda w, t: ["transform", "tiny-llama", "--out", write(t, "f.txt", "x") + "/sub"],
        ["f.txt/sub' is under", "which is a file"],
    ),
    # data make
    (
        "data-unknown-suite",
        lambda w, t: ["data", "make", "--suite", "foo", "--out", str(t / "o")],
        ["--suite: unknown suite 'foo'; allowed: inter, intra"],
    ),
    (
        "data-zero-examples",
        lambda w, t: ["data", "make", "--suite", "inter", "--out", str(t / "o"), "--train", "0"],
        ["--train: 0 is not allowed; expected an integer >= 1"],
    ),
    (
        "data-non-empty-out",
        lambda w, t: ["data", "make", "--suite", "inter", "--out", _nonempty(t)],
        ["exists and is not empty", "--overwrite"],
    ),
    # train: run directory and adapter files
    (
        "train-not-a-run",
        lambda w, t: ["train", str(t / "nope"), "--data", train_jsonl(w)],
        ["no adapter_config.json (not a malora-fx adapter directory)"],
    ),
    (
        "train-empty-adapter-config",
        lambda w, t: ["train", run_with(w, t, lambda r: (r / CFG).write_text("")), "--data", train_jsonl(w)],
        ["adapter_config.json: not valid JSON"],
    ),
    (
        "train-truncated-adapter-config",
        lambda w, t: ["train", run_with(w, t, lambda r: _truncate(r / CFG, 40)), "--data", train_jsonl(w)],
        ["adapter_config.json: not valid JSON"],
    ),
    (
        "train-unknown-config-key",
        lambda w, t: ["train", run_with(w, t, lambda r: _edit_json(r / CFG, rnak=3)), "--data", train_jsonl(w)],
        ["adapter_config.json: unknown key 'rnak'; allowed: format, base_model"],
    ),
    (
        "train-newer-format",
        lambda w, t: [
            "train",
            run_with(w, t, lambda r: _edit_json(r / CFG, format="malora-fx/2")),
            "--data",
            train_jsonl(w),
        ],
        ["format 'malora-fx/2' is not supported", "supported: 'malora-fx/1'"],
    ),
    (
        "train-bad-config-value",
        lambda w, t: ["train", run_with(w, t, lambda r: _edit_json(r / CFG, top_k=5)), "--data", train_jsonl(w)],
        ["adapter_config.json: top_k: 5 is larger than num_experts=2"],
    ),
    (
        "train-truncated-safetensors",
        lambda w, t: [
            "train",
            run_with(w, t, lambda r: _truncate(r / ST, 200)),
            "--data",
            train_jsonl(w),
            "--steps",
            "1",
        ],
        ["adapter_model.safetensors: not a readable safetensors file"],
    ),
    (
        "train-adapters-of-another-method",
        lambda w, t: [
            "train",
            run_with(w, t, lambda r: _edit_json(r / CFG, method="molora", shared_rank=None)),
            "--data",
            train_jsonl(w),
            "--steps",
            "1",
        ],
        ["adapter_model.safetensors: missing tensor 'model.layers.0.self_attn.q_proj.A'"],
    ),
    # train: data and options
    (
        "train-missing-data",
        lambda w, t: ["train", str(w["run"]), "--data", str(t / "nope.jsonl")],
        ["nope.jsonl: no such data file"],
    ),
    ("train-empty-data", lambda w, t: ["train", str(w["run"]), "--data", write(t, "e.jsonl", "")], ["empty data file"]),
    (
        "train-truncated-jsonl",
        lambda w, t: ["train", str(w["run"]), "--data", write(t, "t.jsonl", Path(train_jsonl(w)).read_text()[:150])],
        ["t.jsonl:2: not valid JSON"],
    ),
    (
        "train-jsonl-missing-key",
        lambda w, t: ["train", str(w["run"]), "--data", write(t, "k.jsonl", '{"task": "a", "prompt": "p"}\n')],
        ['k.jsonl:1: "response" must be a string'],
    ),
    (
        "train-steps-and-epochs",
        lambda w, t: ["train", str(w["run"]), "--data", train_jsonl(w), "--steps", "2", "--epochs", "1"],
        ["--steps and --epochs: give one of them, not both"],
    ),
    (
        "train-zero-steps",
        lambda w, t: ["train", str(w["run"]), "--data", train_jsonl(w), "--steps", "0"],
        ["--steps: 0 must be >= 1"],
    ),
    (
        "train-zero-batch",
        lambda w, t: ["train", str(w["run"]), "--data", train_jsonl(w), "--batch-size", "0"],
        ["--batch-size: 0 must be >= 1"],
    ),
    (
        "train-bad-sampling",
        lambda w, t: ["train", str(w["run"]), "--data", train_jsonl(w), "--task-sampling", "temperature:x"],
        ["unknown mode 'temperature:x'; allowed: proportional"],
    ),
    (
        "train-bad-device",
        lambda w, t: ["train", str(w["run"]), "--data", train_jsonl(w), "--device", "tpu"],
        ["--device: 'tpu'; allowed: cpu, cuda, cuda:N"],
    ),
    # eval / inspect
    (
        "eval-missing-data",
        lambda w, t: ["eval", str(w["run"]), "--data", str(t / "nope.jsonl")],
        ["nope.jsonl: no such data file"],
    ),
    (
        "eval-zero-batch",
        lambda w, t: ["eval", str(w["run"]), "--data", train_jsonl(w), "--batch-size", "0"],
        ["--batch-size: 0 is not allowed; expected an integer >= 1"],
    ),
    (
        "inspect-truncated-jsonl",
        lambda w, t: ["inspect", str(w["run"]), "--data", write(t, "t.jsonl", Path(train_jsonl(w)).read_text()[:150])],
        ["t.jsonl:2: not valid JSON"],
    ),
    # export
    (
        "export-bad-dtype",
        lambda w, t: ["export", str(w["run"]), "--out", str(t / "o"), "--dtype", "fp8"],
        ["--dtype: 'fp8'; allowed: fp32, fp16"],
    ),
    (
        "export-old-opset",
        lambda w, t: ["export", str(w["run"]), "--out", str(t / "o"), "--opset", "13"],
        ["--opset: 13 is too old; allowed: >= 18"],
    ),
    (
        "export-non-empty-out",
        lambda w, t: ["export", str(w["run"]), "--out", _nonempty(t)],
        ["exists and is not empty", "--overwrite"],
    ),
    (
        "export-base-only-switchable",
        lambda w, t: ["export", str(w["run"]), "--out", str(t / "o"), "--base-only", "--switchable"],
        ["--base-only: cannot be combined with --switchable"],
    ),
    (
        "export-adapter-only-name",
        lambda w, t: ["export", str(w["run"]), "--out", str(t / "a.onnx"), "--adapter-only"],
        ["--adapter-only: --out", "must end with .onnx_adapter"],
    ),
    ("export-not-a-run", lambda w, t: ["export", str(t / "nope"), "--out", str(t / "o")], ["no adapter_config.json"]),
    # run
    (
        "run-not-an-export",
        lambda w, t: ["run", str(t / "nope"), "--prompt", "x"],
        ["no model.onnx / export.json (not a malora-fx export directory)"],
    ),
    (
        "run-truncated-export-json",
        lambda w, t: ["run", exp_with(w, t, lambda e: _truncate(e / "export.json", 50)), "--prompt", "x"],
        ["export.json"],
    ),
    (
        "run-truncated-model-onnx",
        lambda w, t: ["run", exp_with(w, t, lambda e: _truncate(e / "model.onnx", 1000)), "--prompt", "x"],
        ["model.onnx: onnxruntime", "cannot load it"],
    ),
    (
        "run-empty-model-onnx",
        lambda w, t: ["run", exp_with(w, t, lambda e: _truncate(e / "model.onnx", 0)), "--prompt", "x"],
        ["model.onnx: onnxruntime", "cannot load it"],
    ),
    (
        "run-ort-truncated-model-onnx",
        lambda w, t: [
            "run",
            exp_with(w, t, lambda e: _truncate(e / "model.onnx", 1000)),
            "--prompt",
            "x",
            "--backend",
            "ort",
        ],
        ["model.onnx: onnxruntime cannot load it"],
    ),
    (
        "run-genai-no-genai-config",
        lambda w, t: [
            "run",
            exp_with(w, t, lambda e: (e / "genai_config.json").unlink()),
            "--prompt",
            "x",
            "--backend",
            "genai",
        ],
        ["no genai_config.json; export the run again", "or use --backend ort"],
    ),
    (
        "run-genai-no-model-file",
        lambda w, t: [
            "run",
            exp_with(w, t, lambda e: (e / "model.onnx").unlink()),
            "--prompt",
            "x",
            "--backend",
            "genai",
        ],
        ["genai_config.json names 'model.onnx', which is not there"],
    ),
    (
        "run-genai-io-binding",
        lambda w, t: ["run", str(w["exp"]), "--prompt", "x", "--backend", "genai", "--io-binding"],
        ["--io-binding: applies to --backend ort only"],
    ),
    (
        "run-unknown-backend",
        lambda w, t: ["run", str(w["exp"]), "--prompt", "x", "--backend", "vllm"],
        ["--backend: unknown backend 'vllm'; allowed: auto, genai, ort"],
    ),
    (
        "run-negative-max-new-tokens",
        lambda w, t: ["run", str(w["exp"]), "--prompt", "x", "--max-new-tokens", "-1"],
        ["--max-new-tokens: -1 is not allowed; expected an integer >= 0"],
    ),
    (
        "run-unknown-provider",
        lambda w, t: ["run", str(w["exp"]), "--prompt", "x", "--provider", "tpu"],
        ["--provider: unknown provider 'tpu'; allowed: auto, cuda, cpu"],
    ),
    (
        "run-missing-adapter",
        lambda w, t: ["run", str(w["exp"]), "--prompt", "x", "--adapter", str(t / "a.onnx_adapter")],
        ["--adapter: ", "a.onnx_adapter does not exist"],
    ),
    (
        "run-adapter-on-fixed-export",
        lambda w, t: ["run", str(w["exp"]), "--prompt", "x", "--adapter", write(t, "j.onnx_adapter", b"junk")],
        ["is not a switchable export", "cannot be swapped"],
    ),
    # import-peft
    (
        "peft-no-config",
        lambda w, t: ["import-peft", write(t, "p/.keep", "")[:-6], "--base", "tiny-llama", "--out", str(t / "o")],
        ['no PEFT adapter_config.json (with "peft_type")'],
    ),
    (
        "peft-unsupported-type",
        lambda w, t: [
            "import-peft",
            _peft(t, {"peft_type": "IA3"}, None),
            "--base",
            "tiny-llama",
            "--out",
            str(t / "o"),
        ],
        ["peft_type 'IA3' is not supported; allowed: LORA"],
    ),
    # bench
    ("bench-without-run", lambda w, t: ["bench", str(w["exp"])], ["--run: required", "for information only"]),
    (
        "bench-run-of-another-method",
        lambda w, t: [
            "bench",
            str(w["exp"]),
            "--run",
            run_with(w, t, lambda r: _edit_json(r / CFG, method="molora", shared_rank=None)),
        ],
        ["--run: ", "has method 'molora', the export was made with 'malora'"],
    ),
    (
        "bench-zero-repeats",
        lambda w, t: ["bench", str(w["exp"]), "--run", str(w["run"]), "--repeats", "0"],
        ["--repeats: 0 must be >= 1"],
    ),
    (
        "bench-genai-batch-2",
        lambda w, t: ["bench", str(w["exp"]), "--run", str(w["run"]), "--backend", "genai", "--batch", "2"],
        ["--batch: 2; onnxruntime-genai is timed at batch 1 only"],
    ),
    (
        "bench-not-an-export",
        lambda w, t: ["bench", str(t / "nope"), "--run", str(w["run"])],
        ["no model.onnx / export.json"],
    ),
]


def _leftovers(*folders: Path) -> list[str]:
    return [str(p) for folder in folders if folder.exists() for p in folder.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize(("argv", "messages"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_bad_input(ws, tmp_path, capsys, argv, messages):
    args = argv(ws, tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    fixtures_before = sorted(str(p) for p in Path(ws["root"]).rglob("*"))
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("malora-fx") and "error: " in line]
    assert code == 2 and len(errors) == 1 and err[-1] == errors[0], err
    assert "\n" not in errors[0] and "Traceback" not in errors[0]
    for message in messages:
        assert message in errors[0], errors[0]
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing new, nothing half-written
    assert sorted(str(p) for p in Path(ws["root"]).rglob("*")) == fixtures_before
    assert not _leftovers(tmp_path, Path(ws["root"]))


def _api_run(ws, tmp, fix):
    return run_with(ws, tmp, fix)


API_CASES = [
    ("load_model-missing", lambda w, t: partial(mf.load_model, str(t / "nope")), ["does not exist"]),
    (
        "config-shared-rank-lora",
        lambda w, t: partial(mf.MALoRAConfig, method="lora", shared_rank=8),
        ["shared_rank: 8 given for method 'lora'"],
    ),
    (
        "config-from-dict-unknown-key",
        lambda w, t: partial(mf.MALoRAConfig.from_dict, {"method": "lora", "rnak": 4}),
        ["unknown config key 'rnak'; allowed: method, targets"],
    ),
    (
        "read_adapter_config-unknown-key",
        lambda w, t: partial(mf.read_adapter_config, _api_run(w, t, lambda r: _edit_json(r / CFG, rnak=3))),
        ["adapter_config.json: unknown key 'rnak'"],
    ),
    (
        "read_adapter_config-missing-key",
        lambda w, t: partial(
            mf.read_adapter_config,
            _api_run(
                w,
                t,
                lambda r: (r / CFG).write_text(
                    json.dumps({k: v for k, v in json.loads((r / CFG).read_text()).items() if k != "sites"})
                ),
            ),
        ),
        ["adapter_config.json: missing key 'sites'"],
    ),
    (
        "TrainArgs-steps-and-epochs",
        lambda w, t: partial(mf.TrainArgs, steps=2, epochs=1),
        ["steps and epochs: give one of them, not both"],
    ),
    (
        "export_run-dtype",
        lambda w, t: partial(mf.export_run, w["run"], t / "o", dtype="fp8"),
        ["dtype: 'fp8'; allowed: fp32, fp16"],
    ),
    ("export_run-opset", lambda w, t: partial(mf.export_run, w["run"], t / "o", opset=13), ["opset: 13 is too old"]),
    (
        "OrtGenerator-provider",
        lambda w, t: partial(mf.OrtGenerator, w["exp"], "tpu"),
        ["provider: unknown provider 'tpu'; allowed: auto, cuda, cpu"],
    ),
    (
        "ExportManifest-truncated",
        lambda w, t: partial(mf.ExportManifest.read, exp_with(w, t, lambda e: _truncate(e / "export.json", 50))),
        ["export.json"],
    ),
    (
        "ExportManifest-newer-format",
        lambda w, t: partial(
            mf.ExportManifest.read, exp_with(w, t, lambda e: _edit_json(e / "export.json", format="malora-fx-export/9"))
        ),
        ["malora-fx-export/9", "malora-fx-export/1"],
    ),
    (
        "write_suite-unknown",
        lambda w, t: partial(mf.write_suite, "foo", t / "o", train=1, eval=1, seed=0),
        ["unknown suite 'foo'; allowed: inter"],
    ),
]


@pytest.mark.parametrize(("call", "messages"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_refuses_bad_input_naming_parameters(ws, tmp_path, call, messages):
    call = call(ws, tmp_path)  # builds the bad input; the call itself must write nothing
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(MaloraError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    assert not any(word.startswith("--") for word in message.split()), message  # parameters, not flags
    for expected in messages:
        assert expected in message, message
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert not _leftovers(tmp_path)


def test_case_table_is_large_enough():
    assert len(CLI_CASES) + len(API_CASES) >= 40
    covered = {case[0].split("-")[0] for case in CLI_CASES}
    assert covered >= {"transform", "data", "train", "eval", "inspect", "export", "run", "peft", "bench"}
