"""`malora-fx train`: a run, checkpoints that survive SIGKILL, data parallel parity, bad input; a GraphModule
held in Python trains exactly like the equivalent run directory."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import malora_fx as mf
from malora_fx.adapters.files import adapter_state_dict
from malora_fx.cli import main
from malora_fx.graph.tiny_models import tiny_tokenizer
from malora_fx.training.args import TrainArgs
from malora_fx.training.checkpoint import latest_checkpoint
from malora_fx.training.loop import train
from malora_fx.training.suites import write_suite

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
TRAIN = ["--batch-size", "4", "--lr", "2e-3", "--no-progress", "--seed", "1"]


def free_port() -> int:
    """A TCP port nobody listens on now (bound to port 0, read, closed): two runs never share a fixed one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "malora_fx.cli", *args], capture_output=True, text=True, env=ENV, **kwargs
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_suite("inter", root / "data", train=12, eval=2, seed=0)
    assert (
        main(
            [
                "transform",
                "tiny-llama",
                "--out",
                str(root / "init"),
                "--targets",
                "q_proj,v_proj,down_proj",
                "--dropout",
                "0.1",
            ]
        )
        == 0
    )
    return root


def fresh_run(workspace, name):
    run = workspace / name
    shutil.copytree(workspace / "init", run)
    return run


def adapters(run):
    return load_file(str(Path(run) / "adapter_model.safetensors"))


def test_train_writes_adapters_metrics_plot_and_checkpoints(workspace):
    run = fresh_run(workspace, "basic")
    before = adapters(run)
    data = workspace / "data"
    proc = cli(
        "train",
        str(run),
        "--data",
        str(data / "train.jsonl"),
        "--eval",
        str(data / "eval.jsonl"),
        "--steps",
        "5",
        "--save-every",
        "2",
        "--keep",
        "2",
        *TRAIN,
    )
    assert proc.returncode == 0, proc.stderr
    after = adapters(run)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert all(r["aux_loss"] > 0 and r["tokens"] > 0 for r in steps)
    assert steps[0]["lr"] > steps[-1]["lr"]  # cosine decay
    assert "eval_loss" in rows[-1] and set(rows[-1]["eval_loss"]) == {
        "arithmetic",
        "currency",
        "reverse",
        "sentiment",
        "sort",
        "weekday",
    }
    assert (run / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]


def _metric_steps(run) -> list[int]:
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]  # a line being written has no newline yet
    return [json.loads(line)["step"] for line in lines if line.strip()]


# Kill moments, each an observable state of the run (polled, never a sleep): right after the first checkpoint
# is complete; between checkpoints, with two steps done since the last one (lost, redone on resume); as the
# step that writes a checkpoint ends (the checkpoint may be half-written: a .tmp-* directory that resume skips).
KILL_MOMENTS = {
    "after the first checkpoint": lambda run: (Path(run) / "checkpoints" / "step-00000003").is_dir(),
    "between checkpoints": lambda run: 8 in _metric_steps(run),
    "while writing a checkpoint": lambda run: 12 in _metric_steps(run),
}


def test_kill_at_any_moment_then_resume_is_bit_identical(workspace):
    data = str(workspace / "data" / "train.jsonl")
    args = ["--steps", "40", "--save-every", "3", "--keep", "3", *TRAIN]
    reference = fresh_run(workspace, "uninterrupted")
    assert cli("train", str(reference), "--data", data, *args).returncode == 0
    for attempt, (moment, reached) in enumerate(KILL_MOMENTS.items()):
        run = fresh_run(workspace, f"killed{attempt}")
        proc = subprocess.Popen(
            [sys.executable, "-m", "malora_fx.cli", "train", str(run), "--data", data, *args],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 300
        while not reached(run) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, f"{moment}: training ended before it could be killed"
        assert reached(run), f"{moment}: not reached within the timeout"
        done = _metric_steps(run)
        assert done and done[-1] < 40, f"{moment}: killed after the last step"
        resumed = cli("train", str(run), "--data", data, *args, "--resume")
        assert resumed.returncode == 0, resumed.stderr
        assert "resuming from step-" in resumed.stderr
        ref, got = adapters(reference), adapters(run)
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), f"{moment}: resumed run differs"
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 41))


def test_damaged_checkpoint_is_skipped(workspace):
    run = fresh_run(workspace, "damaged")
    data = str(workspace / "data" / "train.jsonl")
    assert cli("train", str(run), "--data", data, "--steps", "4", "--save-every", "2", *TRAIN).returncode == 0
    newest = latest_checkpoint(run)
    assert newest.name == "step-00000004"
    weights = newest / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated by a crash
    assert latest_checkpoint(run).name == "step-00000002"


def test_two_process_gloo_matches_one_process(workspace):
    data = str(workspace / "data" / "train.jsonl")
    args = ["--steps", "4", "--grad-accum", "2", *TRAIN]
    # adapter dropout is off: its masks depend on how the batch is split over ranks
    init = workspace / "init-no-dropout"
    assert main(["transform", "tiny-llama", "--out", str(init), "--targets", "q_proj,v_proj,down_proj"]) == 0
    single, double = workspace / "one", workspace / "two"
    shutil.copytree(init, single)
    shutil.copytree(init, double)
    assert cli("train", str(single), "--data", data, *args).returncode == 0
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "malora_fx.cli",
            "train",
            str(double),
            "--data",
            data,
            *args,
        ],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = adapters(single), adapters(double)
    initial = adapters(init)
    assert any((one[k] - initial[k]).abs().max() > 1e-3 for k in one)
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst <= 1e-5, worst


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda w, r: ["--data", str(w / "empty.jsonl")], "empty data file"),
        (lambda w, r: ["--data", str(w / "bad.jsonl")], "bad.jsonl:2: not valid JSON"),
        (
            lambda w, r: ["--data", str(w / "data" / "train.jsonl"), "--task-sampling", "random"],
            "task sampling: unknown mode 'random'",
        ),
        (lambda w, r: ["--data", str(w / "data" / "train.jsonl"), "--lr=-1e-3"], "learning rate: -0.001 must be > 0"),
        (lambda w, r: ["--data", str(w / "data" / "train.jsonl"), "--resume"], "--resume: no complete checkpoint"),
    ],
)
def test_bad_input_exit_2(workspace, make_args, message, capsys):
    (workspace / "empty.jsonl").write_text("")
    (workspace / "bad.jsonl").write_text('{"task": "a", "prompt": "p", "response": "r"}\n{"task": \n')
    run = fresh_run(workspace, f"bad{abs(hash(message))}")
    code = main(["train", str(run), *make_args(workspace, run), "--steps", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


def test_run_dir_without_adapters_and_existing_checkpoints(workspace, capsys, tmp_path):
    data = str(workspace / "data" / "train.jsonl")
    assert main(["train", str(tmp_path), "--data", data, "--steps", "2"]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    run = fresh_run(workspace, "twice")
    assert main(["train", str(run), "--data", data, "--steps", "2", "--save-every", "1", *TRAIN]) == 0
    snapshot = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    capsys.readouterr()
    assert main(["train", str(run), "--data", data, "--steps", "2", "--save-every", "1", *TRAIN]) == 2
    assert "already has checkpoints (step-00000002); pass --resume" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == snapshot


def test_graph_module_trains_exactly_like_its_run_directory(workspace):
    data = workspace / "data" / "train.jsonl"
    gm = mf.transform(
        mf.load_model("tiny-llama").model, mf.MALoRAConfig(targets="q_proj,v_proj,down_proj", dropout=0.1)
    )
    run = mf.save_adapters(gm, workspace / "from-python", base_model="tiny-llama")
    initial = adapters(run)
    args = TrainArgs(steps=6, batch_size=4, grad_accum=2, lr=2e-3, seed=1, save_every=3)
    quiet = dict(progress=False, say=lambda m: None)
    from_dir = train(run, data, args, **quiet)
    in_python = train(gm, data, args, tokenizer=tiny_tokenizer(), out_dir=workspace / "from-python-out", **quiet)
    assert in_python.gm is gm and from_dir.run_dir == run
    trained_dir, trained_gm = adapters(run), adapter_state_dict(gm)
    assert trained_dir.keys() == trained_gm.keys() == initial.keys()
    assert any(not torch.equal(initial[k], trained_dir[k]) for k in initial)
    assert all(torch.equal(trained_dir[k], trained_gm[k]) for k in trained_dir)
    written = adapters(in_python.run_dir)
    assert all(torch.equal(trained_dir[k], written[k]) for k in trained_dir)
    assert [r["loss"] for r in from_dir.metrics] == [r["loss"] for r in in_python.metrics]
    for root in (run, in_python.run_dir):
        assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
