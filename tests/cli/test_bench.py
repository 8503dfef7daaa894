"""``malora-fx bench``: explicit run directory, scratch exports in a temporary folder, progress lines."""

from __future__ import annotations

import json
import shutil
import tempfile

import pytest

import malora_fx as mf
from malora_fx.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")


def test_bench_leaves_the_export_alone_and_cleans_up(tmp_path, capsys, monkeypatch):
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    run, exp = tmp_path / "run", tmp_path / "exp"
    assert main(["transform", "tiny-llama", "--out", str(run), "--targets", "q_proj", "--experts", "2",
                 "--top-k", "1", "--rank", "2", "--shared-rank", "4"]) == 0  # fmt: skip
    mf.export_run(run, exp)
    # the export is portable: moved elsewhere, the path it recorded is gone, and bench is given the run
    moved = tmp_path / "elsewhere" / "exp"
    shutil.move(str(exp), moved)
    before = sorted(p.name for p in moved.iterdir())
    capsys.readouterr()
    argv = ["bench", str(moved), "--run", str(run), "--no-torch", "--repeats", "1", "--seq", "4", "--new-tokens", "2"]
    assert main([*argv, "--json", str(tmp_path / "t.json")]) == 0
    out, err = capsys.readouterr()
    assert sorted(p.name for p in moved.iterdir()) == before  # nothing written into the export folder
    assert not list(scratch_root.glob("malora-fx-bench-*"))  # scratch exports removed
    assert "builds 2 comparison exports" in err and "temporary folder removed at the end" in err
    stages = [line for line in err.splitlines() if ": done in " in line]
    assert [s.split("]")[0] for s in stages] == ["malora-fx: [1/3", "malora-fx: [2/3", "malora-fx: [3/3"], err
    assert "base export" in out and "lowered export" in out
    assert set(json.loads((tmp_path / "t.json").read_text())) >= {"base export", "lowered export"}
    # --keep keeps them where asked
    keep = tmp_path / "keep"
    assert main([*argv, "--keep", str(keep)]) == 0
    assert (keep / "base" / "export.json").is_file() and not list(scratch_root.glob("malora-fx-bench-*"))
