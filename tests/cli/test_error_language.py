"""One behaviour, two doors: the library names Python parameters, the command line names flags."""

import pytest

import malora_fx as mf
from malora_fx.cli import _command_options, build_parser, cli_message, main
from malora_fx.errors import MaloraError


def _cli_error(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_shared_rank_with_lora_fails_the_same_through_both_doors(capsys):
    with pytest.raises(mf.ConfigError) as api:
        mf.MALoRAConfig(method="lora", shared_rank=8)
    assert str(api.value) == "shared_rank: 8 given for method 'lora'; shared_rank is only used by method 'malora'"
    cli = _cli_error(capsys, "transform", "tiny-llama", "--method", "lora", "--shared-rank", "8", "--dry-run")
    assert cli == (
        "malora-fx: error: --shared-rank: 8 given for method 'lora'; --shared-rank is only used by method 'malora'"
    )


def test_library_errors_name_parameters_not_flags(tmp_path):
    from malora_fx.deploy.manifest import torch_dtype
    from malora_fx.deploy.runner import choose_provider

    cases = [
        (lambda: torch_dtype("fp8"), "dtype: 'fp8'; allowed: fp32, fp16"),
        (lambda: mf.export_run(tmp_path, tmp_path / "out", opset=13), "opset: 13 is too old; allowed: >= 18"),
        (lambda: choose_provider("tpu"), "provider: unknown provider 'tpu'; allowed: auto, cuda, cpu"),
        (lambda: mf.TrainArgs(steps=3, epochs=1), "steps and epochs: give one of them, not both"),
        (lambda: mf.TrainArgs(keep=0), "keep: 0 must be >= 1"),
    ]
    for call, message in cases:
        with pytest.raises(MaloraError) as info:
            call()
        assert str(info.value) == message
        assert "--" not in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "library", "cli"),
    [
        (["export", "R", "--out", "O"], "dtype: 'fp8'; allowed: fp32, fp16", "--dtype: 'fp8'; allowed: fp32, fp16"),
        (["transform", "M"], "top_k: 9 is larger than num_experts=8", "--top-k: 9 is larger than --experts=8"),
        (["train", "R", "--data", "D"], "steps and epochs: give one", "--steps and --epochs: give one"),
        (["train", "R", "--data", "D"], "R has checkpoints; pass resume=True to go on", "pass --resume to go on"),
        (["run", "E", "--prompt", "p"], "adapter: a.onnx_adapter does not exist", "--adapter: a.onnx_adapter does"),
        # only the options of the command being run are translated; file names and other words stay
        (["run", "E", "--prompt", "p"], "dtype: 'fp8'", "dtype: 'fp8'"),
        (["transform", "M"], "model 'top_k.gguf' does not exist", "model 'top_k.gguf' does not exist"),
        (["data", "make", "--suite", "x", "--out", "o"], "suite: unknown suite 'x'", "--suite: unknown suite 'x'"),
    ],
)
def test_cli_maps_parameter_names_to_its_flags(argv, library, cli):
    assert cli in cli_message(library, _command_options(build_parser(), argv))
