"""The data of a sweep: each suite's train, validation and eval splits, written once under ``DIR/data/``."""

from __future__ import annotations

import json
from pathlib import Path

from ..fileio import atomic_write
from .sweep_spec import SuiteSpec

__all__ = ["suite_files"]


def _write_jsonl(path: Path, examples: list[dict[str, str]]) -> None:
    text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def suite_files(out: Path, suite: SuiteSpec, data_seed: int) -> dict[str, Path]:
    """``DIR/data/<key>/{train,validation,eval}.jsonl`` (written once; a pure function of the key).

    The validation split is the first ``validation`` examples of each task in a
    suite drawn with ``train + validation`` training examples per task: its
    prompts differ from every train and eval prompt, and the eval split is the
    one ``malora-fx data make`` writes for the same seed and eval count.
    """
    from .suites import make_suite

    folder = out / "data" / f"{suite.key}-d{data_seed}"
    splits = ("train", "validation", "eval") if suite.validation else ("train", "eval")
    paths = {split: folder / f"{split}.jsonl" for split in splits}
    if all(p.is_file() for p in paths.values()):
        return paths
    train, evaluation = make_suite(suite.name, train=suite.train + suite.validation, eval=suite.eval, seed=data_seed)
    taken: dict[str, int] = {}
    validation, rest = [], []
    for example in train:
        if taken.get(example["task"], 0) < suite.validation:
            taken[example["task"]] = taken.get(example["task"], 0) + 1
            validation.append(example)
        else:
            rest.append(example)
    folder.mkdir(parents=True, exist_ok=True)
    for split, examples in (("train", rest), ("validation", validation), ("eval", evaluation)):
        if split in paths:
            _write_jsonl(paths[split], examples)
    return paths
