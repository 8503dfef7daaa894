"""``malora-fx sweep``: a reproducible, resumable quality sweep over methods, ranks, lrs and seeds.

:func:`run_sweep` expands a spec (:mod:`.sweep_spec`) into cells and runs every
cell not yet finished through the real path: ``transform`` → ``train`` (an
adapted GraphModule, files in the cell's folder) → ``evaluate`` (per-task exact
match and loss on the eval split, and on the validation split when the suite
has one). The base model's numbers are computed once per model × data × eval
settings and cached under ``DIR/base/``.

Layout of ``DIR``::

    spec.json            the validated spec of the latest run
    data/<suite key>/    train.jsonl, validation.jsonl (if any), eval.jsonl (:mod:`.sweep_data`)
    base/<key>.json      the base model's eval (and validation) numbers
    cells/<id>/          a finished cell: adapters (a run directory), metrics.jsonl, loss.png, result.json
    results.jsonl        one line per finished cell; the only record of "done"
    results.md, *.png    the report (:mod:`.sweep_report`)

A cell runs in ``cells/<id>.tmp`` and is renamed when complete; its line is
appended to ``results.jsonl`` last (flushed and fsynced). A cell is finished
when and only when its line is there: a restart removes every ``*.tmp`` folder
and any ``cells/<id>`` without a line, and runs those cells again. A line cut
short by a kill is dropped. Cells are independent of order: the base model is
reused across cells (its weights are frozen), adapters are initialised from
``MALoRAConfig.seed`` and training seeds the global RNG, so a resumed sweep
gives the numbers an uninterrupted one would.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from ..errors import MaloraError
from .sweep_data import suite_files
from .sweep_dir import Say, import_results, prepare_dir, say_stderr, write_json
from .sweep_plan import Waiting, cells, plan_counts, slots
from .sweep_results import RESULTS, append_result, read_results
from .sweep_select import (
    only_seeds,
    parse_seeds,
    parse_shard,
    shard_cells,
    with_device,
    with_methods,
    with_suites,
)
from .sweep_spec import Cell, SweepSpec, load_spec, parse_spec

__all__ = [
    "Cell",
    "append_result",
    "SweepSpec",
    "Waiting",
    "cells",
    "import_results",
    "load_spec",
    "only_seeds",
    "parse_seeds",
    "parse_shard",
    "parse_spec",
    "prepare_dir",
    "plan_counts",
    "RESULTS",
    "Say",
    "read_results",
    "run_sweep",
    "shard_cells",
    "slots",
    "suite_files",
    "with_device",
    "with_methods",
    "with_suites",
]

FORMAT = "malora-fx-sweep/1"


def versions() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "malora_fx": __version__,
    }


def _summary(table: dict[str, dict[str, float]]) -> dict[str, Any]:
    """``evaluate``'s table as ``{exact_match, loss, n, tasks: {...}}`` (averages over tasks)."""
    average = table["average"]
    tasks = {t: dict(row) for t, row in table.items() if t != "average"}
    return {"exact_match": average["exact_match"], "loss": average["loss"], "n": average["n"], "tasks": tasks}


class _Runner:
    """Runs cells; holds the current base model (one at a time) and the cached base numbers."""

    def __init__(self, out: Path, say: Say) -> None:
        self.out, self.say = out, say
        self.model_name: str | None = None
        self.loaded: Any = None

    def _load(self, name: str):
        from ..graph.cached_decoder import is_decoder
        from ..graph.sources import load_model

        if self.model_name != name:
            self.loaded = self.model_name = None
            gc.collect()
            self.say(f"loading {name}")
            loaded = load_model(name)
            if loaded.on_meta or loaded.tokenizer is None or not is_decoder(loaded.model):
                raise MaloraError(f"models: {name!r} is not a text-generating model with a tokenizer and weights")
            self.loaded, self.model_name = loaded, name
        return self.loaded

    def _evaluate(self, logits_fn, cell: Cell, paths: dict[str, Path], decoder=None) -> dict[str, Any]:
        """Eval (and validation) scores; ``decoder`` (a CachedDecoder) makes greedy decoding use a KV cache."""
        from .data import read_jsonl
        from .evaluate import evaluate

        results: dict[str, Any] = {}
        for split in ("eval", "validation"):
            if split in paths:
                table = evaluate(
                    logits_fn,
                    self.loaded.tokenizer,
                    read_jsonl(paths[split]),
                    max_length=cell.eval.max_length,
                    batch_size=cell.eval.batch_size,
                    max_new_tokens=cell.eval.max_new_tokens,
                    device=cell.train.device,
                    decoder=decoder,
                )
                results[split] = _summary(table)
        return results

    def base(self, cell: Cell, paths: dict[str, Path]) -> dict[str, Any]:
        """The base model's numbers for this cell's model, data and eval settings (cached on disk)."""
        import hashlib

        key = {"model": cell.model, "data": paths["eval"].parent.name, "eval": cell.settings()["eval"]}
        key["device"] = cell.train.device
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
        path = self.out / "base" / f"{paths['eval'].parent.name}-{digest}.json"
        if path.is_file():
            return json.loads(path.read_text())["results"]
        self.say(f"evaluating the base model {cell.model} on {paths['eval'].parent.name}")
        from .eval_decoder import cached_decoder

        model = self.loaded.model.to(cell.train.device)
        results = self._evaluate(
            lambda ids, mask: model(input_ids=ids, attention_mask=mask, use_cache=False).logits,
            cell,
            paths,
            cached_decoder(model),
        )
        model.to("cpu")  # cells capture and initialise adapters on the CPU, whatever the device
        write_json(path, {"key": key, "results": results})
        return results

    def _cached_decoder(self, gm, device: str):
        """The trained adapters copied into the base model captured with a KV cache, on ``device``.

        The capture runs on the CPU: ``gm`` shares the base weights with the loaded model, and
        training moved those (not the model's buffers) to ``device``; both go back first, and
        ``gm`` returns to ``device`` for the loss pass."""
        from ..graph.move import move_to_device
        from .eval_decoder import cached_decoder

        move_to_device(gm, "cpu")
        self.loaded.model.to("cpu")
        decoder = cached_decoder(self.loaded.model, gm)
        move_to_device(gm, device)
        return decoder.to(device) if decoder is not None else None

    def run(self, cell: Cell, say_step: Say) -> dict[str, Any]:
        from ..adapters.accounting import percent
        from ..adapters.files import save_adapters
        from ..adapters.transform import set_adapters_training, trainable_parameters, transform
        from ..passes import BASE_PARAMETERS_KEY
        from .loop import train

        began = time.perf_counter()
        final = self.out / "cells" / cell.id
        tmp = final.with_name(final.name + ".tmp")
        for stale in (tmp, final):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            paths = suite_files(self.out, cell.suite, cell.data_seed)
            loaded = self._load(cell.model)
            base = self.base(cell, paths)
            say_step("transform")
            gm = transform(loaded.model.to("cpu"), cell.config)  # train() moves it to the device
            trainable = sum(p.numel() for p in trainable_parameters(gm))
            base_parameters = int(gm.meta[BASE_PARAMETERS_KEY])
            say_step("train")
            result = train(
                gm, paths["train"], cell.train, tokenizer=loaded.tokenizer, out_dir=tmp, progress=False, say=say_step
            )
            save_adapters(gm, tmp, base_model=cell.model)  # a run directory `malora-fx eval/export` can open
            trained = time.perf_counter()
            say_step("eval")
            set_adapters_training(gm, False)
            decoder = self._cached_decoder(gm, cell.train.device)
            scores = self._evaluate(
                lambda ids, mask: gm(input_ids=ids, attention_mask=mask).logits, cell, paths, decoder
            )
            steps = [r for r in result.metrics if "tokens" in r]
            seconds = sum(r["seconds"] for r in steps)
            row = {
                "format": FORMAT,
                "id": cell.id,
                "model": cell.model,
                "suite": cell.suite.name,
                "method_name": cell.method_name,
                "method": cell.config.method,
                "rank": cell.config.rank,
                "shared_rank": cell.config.shared_rank,
                "experts": cell.config.num_experts,
                "top_k": cell.config.top_k,
                "steps": cell.train.steps,
                "lr": cell.train.lr,
                "seed": cell.seed,
                "settings": cell.settings(),
                "eval": scores["eval"],
                "validation": scores.get("validation"),
                "base": base,
                "trainable_parameters": trainable,
                "base_parameters": base_parameters,
                "trainable_percent": percent(trainable, base_parameters),
                "final_train_loss": result.final_loss,
                "train_tokens_per_s": sum(r["tokens"] for r in steps) / max(seconds, 1e-9),
                "train_response_tokens_per_s": sum(r["response_tokens"] for r in steps) / max(seconds, 1e-9),
                "train_seconds": seconds,  # the optimizer steps only; wall_seconds has loading and capture too
                "eval_seconds": time.perf_counter() - trained,
                "wall_seconds": time.perf_counter() - began,
                "versions": versions(),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            write_json(tmp / "result.json", row)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return row


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _counts(plan: list[Cell | Waiting], done: set[str]) -> str:
    """``"K already done, M to run"`` (and ``", W waiting for the lr choice"``)."""
    finished, to_run, waiting = plan_counts(plan, done)
    return f"{finished} already done, {to_run} to run" + (f", {waiting} waiting for the lr choice" if waiting else "")


def run_sweep(
    spec: SweepSpec | str | Path,
    out: str | Path,
    *,
    report: bool = True,
    say: Say | None = None,
    shard: tuple[int, int] | None = None,
    only_own_cells: bool = False,
    seeds: tuple[int, ...] | None = None,
) -> list[dict[str, Any]]:
    """Run every unfinished cell of ``spec`` into ``out``; return all finished rows (and write the report).

    ``shard=(I, N)`` runs only shard I of N (:func:`shard_cells`); N processes, one per shard, can run
    at once into the same ``out`` (each appends its own lines; write the report once they are done).
    ``only_own_cells`` (implied by ``shard``) leaves the unfinished folders of cells that are not
    ``spec``'s alone: another run into ``out`` (``--methods`` of another label) may be working on them.
    ``seeds`` runs only the cells of those seeds (:func:`only_seeds`; implies ``only_own_cells``).
    With ``lr_search_seeds``, a later seed's cell runs once the search cells of its setting have
    finished (:mod:`.sweep_plan`); cells still waiting at the end are named in one message.
    """
    say = say or say_stderr
    spec = spec if isinstance(spec, SweepSpec) else load_spec(spec)
    out = Path(out)
    rows = read_results(out / RESULTS)
    plan = shard_cells(only_seeds(slots(spec, rows), seeds), shard)
    own = {c.id for c in plan if isinstance(c, Cell)} if shard or only_own_cells or seeds else None
    rows = prepare_dir(out, spec, say, own)
    done = {r["id"] for r in rows}
    where = f" in shard {shard[0]}/{shard[1]}" if shard else ""
    of_shard = f" of shard {shard[0]}/{shard[1]}" if shard else ""
    say(f"{len(plan)} cells{where}, {_counts(plan, done)}")
    runner, spent, number = _Runner(out, say), 0.0, 0
    while todo := [c for c in plan if isinstance(c, Cell) and c.id not in done]:
        cell, number = todo[0], number + 1
        label = f"cell {plan_counts(plan, done)[0] + 1}/{len(plan)}{of_shard} {cell.id}"

        def say_step(message: str, label: str = label) -> None:
            say(f"{label}: {message}")

        say_step("starting")
        row = runner.run(cell, say_step)
        append_result(out / RESULTS, row)
        rows = read_results(out / RESULTS)  # with the lines of other runs into ``out`` (shards)
        done = {r["id"] for r in rows}
        spent += row["wall_seconds"]
        plan = shard_cells(only_seeds(slots(spec, rows), seeds), shard)  # a search cell may choose an lr
        finished, to_run, waiting = plan_counts(plan, done)
        left, score = to_run + waiting, row["eval"]["exact_match"]
        say(
            f"cell {finished}/{len(plan)}{of_shard} done (eval EM {100 * score:.1f}%, "
            f"{row['wall_seconds']:.0f} s), {left} left, ETA {_clock(spent / number * left)}"
        )
    still = [slot.name for slot in plan if isinstance(slot, Waiting)]
    if still:
        say(
            f"{len(still)} cells wait for the lr choice (first: {still[0]}): the search cells of their "
            "setting are not all finished; run again when the runs working on them are done"
        )
    rows = read_results(out / RESULTS)
    if report and rows:
        from .sweep_report import write_report

        written = write_report(out)
        say("report: " + ", ".join(str(p) for p in written))
    return rows
