"""The sweep report: ``DIR/results.md`` and plots from ``DIR/results.jsonl`` alone.

Cells are grouped by model × suite × method (label) × rank × steps × lr; each
group shows mean ± sample std over its seeds. When the cells have a validation
split, the learning rate of each model × suite × method × rank × steps is the
one with the best mean validation exact match (ties: lower validation loss) on
the seeds every lr ran, and the "chosen" table and the plots report the eval
split at that lr; without a validation split the plots use every lr and the
table lists them all. The eval split never picks anything. Methods sharing two
seeds or more are also compared seed by seed (:mod:`.sweep_paired`).

Plots (matplotlib, Agg): ``methods.png`` (bars per method), ``rank_sweep.png``
(exact match against expert rank per method, when some method has two ranks or
more) and ``params_vs_accuracy.png`` (trainable % of base against exact match).
"""

from __future__ import annotations

import os
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MaloraError
from ..fileio import atomic_write
from .sweep import RESULTS, read_results
from .sweep_paired import paired_tables
from .sweep_plan import lr_score

REPORT = "results.md"


@dataclass
class Group:
    """The cells (one per seed) of one setting."""

    model: str
    suite: str
    method_name: str
    method: str
    rank: int
    steps: int
    lr: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    compared: tuple[float, ...] = ()  # set by choose_lr on the chosen group: the lrs it was chosen from

    @property
    def setting(self) -> tuple:
        """The key of the lr choice: everything but the lr."""
        return (self.model, self.suite, self.method_name, self.rank, self.steps)

    def _values(self, split: str, metric: str) -> list[float]:
        return [r[split][metric] for r in self.rows if r.get(split)]

    def mean(self, split: str = "eval", metric: str = "exact_match") -> float:
        values = self._values(split, metric)
        return statistics.fmean(values) if values else float("nan")

    def std(self, split: str = "eval", metric: str = "exact_match") -> float | None:
        values = self._values(split, metric)
        return statistics.stdev(values) if len(values) > 1 else None

    def task_mean(self, task: str) -> float:
        return statistics.fmean(r["eval"]["tasks"][task]["exact_match"] for r in self.rows)

    @property
    def has_validation(self) -> bool:
        return all(r.get("validation") for r in self.rows)

    @property
    def parameters(self) -> int:
        return int(self.rows[0]["trainable_parameters"])

    @property
    def percent(self) -> float:
        return float(self.rows[0]["trainable_percent"])

    @property
    def tokens_per_s(self) -> float:
        return statistics.fmean(r["train_tokens_per_s"] for r in self.rows)


def group_rows(rows: list[dict[str, Any]]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for r in rows:
        key = (r["model"], r["suite"], r["method_name"], r["method"], r["rank"], r["steps"], r["lr"])
        groups.setdefault(key, Group(*key)).rows.append(r)
    return list(groups.values())


def choose_lr(groups: list[Group]) -> list[Group] | None:
    """Per setting, the group whose lr has the best mean validation EM (ties: lower loss); None without validation.

    The lrs are compared on the seeds that all of them ran: with ``lr_search_seeds``, the later seeds
    ran the chosen lr only, and would otherwise weigh in on its side."""
    if not groups or not all(g.has_validation for g in groups):
        return None
    by_setting: dict[tuple, list[Group]] = defaultdict(list)
    for g in groups:
        by_setting[g.setting].append(g)
    chosen = []
    for candidates in by_setting.values():
        common = set.intersection(*({r["seed"] for r in g.rows} for g in candidates))

        def score(g: Group, common: set[int] = common) -> tuple[float, float]:
            return lr_score([r for r in g.rows if r["seed"] in common] if common else g.rows)

        best = max(candidates, key=score)
        best.compared = tuple(sorted(g.lr for g in candidates))
        chosen.append(best)
    return chosen


def _pct(mean: float, std: float | None) -> str:
    return f"{100 * mean:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")


def _loss(mean: float, std: float | None) -> str:
    return f"{mean:.3f}" + ("" if std is None else f" ± {std:.3f}")


def _bases(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The base model's eval numbers per model × suite (the first cell's; all share the cached value)."""
    bases: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        bases.setdefault((r["model"], r["suite"]), r["base"]["eval"])
    return bases


def _table(groups: list[Group], bases: dict, *, validation: bool, speed: bool, compared: bool = False) -> list[str]:
    """One row per group; ``compared`` adds the lrs each chosen group was chosen from (a search still
    under way shows fewer than the spec's)."""
    head = ["model", "suite", "method", "rank", "steps", "lr", "seeds", "eval EM %", "eval loss"]
    head += ["val EM %"] * validation + ["trainable", "% of base"] + ["train tok/s"] * speed
    head += ["chosen from lrs"] * compared
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(groups, key=lambda g: (g.model, g.suite, g.method_name, g.rank, g.steps, g.lr))
    for key in sorted({(g.model, g.suite) for g in groups}):
        base = bases[key]
        cells = [*key, "base (no adapters)", "", "", "", "", _pct(base["exact_match"], None), _loss(base["loss"], None)]
        cells += [""] * validation + ["0", "0.00"] + [""] * speed + [""] * compared
        lines.append("| " + " | ".join(cells) + " |")
        for g in (g for g in order if (g.model, g.suite) == key):
            cells = [g.model, g.suite, g.method_name, str(g.rank), str(g.steps), f"{g.lr:g}", str(len(g.rows))]
            cells += [_pct(g.mean(), g.std()), _loss(g.mean("eval", "loss"), g.std("eval", "loss"))]
            cells += [_pct(g.mean("validation"), g.std("validation"))] * validation
            cells += [f"{g.parameters:,}", f"{g.percent:.2f}"] + [f"{g.tokens_per_s:.0f}"] * speed
            cells += [", ".join(f"{lr:g}" for lr in g.compared)] * compared
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _per_task(groups: list[Group], bases: dict) -> list[str]:
    lines = []
    for key in sorted({(g.model, g.suite) for g in groups}):
        tasks = list(bases[key]["tasks"])
        lines += [f"### {key[0]} / {key[1]}: exact match % per task (mean over seeds)", ""]
        lines += ["| method | rank | steps | lr | " + " | ".join(tasks) + " | average |"]
        lines += ["|" + "---|" * (len(tasks) + 5)]
        base = bases[key]
        row = [f"{100 * base['tasks'][t]['exact_match']:.1f}" for t in tasks]
        lines.append("| base (no adapters) | | | | " + " | ".join(row) + f" | {100 * base['exact_match']:.1f} |")
        for g in sorted((g for g in groups if (g.model, g.suite) == key), key=lambda g: (g.method_name, g.rank)):
            row = [f"{100 * g.task_mean(t):.1f}" for t in tasks] + [f"{100 * g.mean():.1f}"]
            lines.append(f"| {g.method_name} | {g.rank} | {g.steps} | {g.lr:g} | " + " | ".join(row) + " |")
        lines.append("")
    return lines


def render_markdown(rows: list[dict[str, Any]], plots: list[Path]) -> str:
    groups = group_rows(rows)
    chosen = choose_lr(groups)
    bases = _bases(rows)
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "# Sweep results",
        "",
        f"{len(rows)} finished cells from `{RESULTS}` ({len(groups)} settings, seeds {', '.join(map(str, seeds))}). "
        "EM = exact match of greedy decoding, averaged over tasks; loss = mean cross-entropy on response tokens "
        "(eval split). Mean ± sample std over seeds (no ± with one seed). Trainable parameters include routers; "
        "% of base = trainable / base model parameters.",
        "",
    ]
    if chosen is not None:
        lines += [
            "## Learning rate chosen on the validation split",
            "",
            "One row per model × suite × method × rank × steps: the lr with the best mean validation EM "
            "(ties: lower validation loss); eval numbers at that lr. The last column lists the lrs that "
            "finished and were compared (fewer than the spec's while a search is under way).",
            "",
            *_table(chosen, bases, validation=True, speed=False, compared=True),
            "",
        ]
    one_lr = chosen if chosen is not None else groups  # without validation: paired only if no setting has two lrs
    paired = paired_tables(one_lr) if len({g.setting for g in one_lr}) == len(one_lr) else []
    if paired:
        lines += [
            "## Paired differences",
            "",
            "Method against method on the seeds both ran (same data, same init seed), at the lr of the table "
            "above: row minus column eval EM in points, mean ± sample std of the per-seed differences, the "
            "number of seeds in parentheses. A gap smaller than its std is not one these seeds resolve.",
            "",
            *paired,
        ]
    lines += ["## Per task", ""]
    lines += _per_task(chosen if chosen is not None else groups, bases)
    lines += ["## All cells", "", *_table(groups, bases, validation=chosen is not None, speed=True), ""]
    versions = sorted({" ".join(f"{k} {v}" for k, v in sorted(r["versions"].items())) for r in rows})
    lines += ["Versions: " + "; ".join(versions), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


def _plot_groups(rows: list[dict[str, Any]]) -> list[Group]:
    groups = group_rows(rows)
    return choose_lr(groups) or groups


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def _panels(groups: list[Group], title: str):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    keys = sorted({(g.model, g.suite) for g in groups})
    fig = Figure(figsize=(max(6.0, 5.0 * len(keys)), 4.5))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    fig.suptitle(title)
    panels = [(key, ax, [g for g in groups if (g.model, g.suite) == key]) for key, ax in zip(keys, axes, strict=True)]
    return fig, panels


def _ylim(ax, tops: list[float]) -> None:
    """Exact match axis from 0, to a little above the highest bar, point or error bar (at least 10%)."""
    ax.set_ylim(0, min(105.0, max([10.0, *(1.15 * t for t in tops if t == t)])))


def _label(g: Group, groups: list[Group]) -> str:
    ranks = {h.rank for h in groups if h.method_name == g.method_name}
    steps = {h.steps for h in groups if h.method_name == g.method_name}
    lrs = {h.lr for h in groups if h.method_name == g.method_name and h.rank == g.rank}
    return (
        g.method_name
        + (f" r{g.rank}" if len(ranks) > 1 else "")
        + (f" {g.steps} st" if len(steps) > 1 else "")
        + (f" lr {g.lr:g}" if len(lrs) > 1 else "")
    )


def plot_methods(rows: list[dict[str, Any]], path: Path) -> None:
    groups = _plot_groups(rows)
    bases = _bases(rows)
    fig, panels = _panels(groups, "eval exact match per method (mean ± std over seeds)")
    for key, ax, mine in panels:
        mine.sort(key=lambda g: (g.method_name, g.rank, g.steps, g.lr))
        labels = [_label(g, mine) for g in mine]
        ax.bar(range(len(mine)), [100 * g.mean() for g in mine], yerr=[100 * (g.std() or 0) for g in mine], capsize=3)
        ax.axhline(100 * bases[key]["exact_match"], color="gray", linestyle="--", label="base")
        _ylim(ax, [100 * (g.mean() + (g.std() or 0)) for g in mine] + [100 * bases[key]["exact_match"]])
        ax.set_xticks(range(len(mine)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("exact match %")
        ax.set_title(f"{key[0]} / {key[1]}")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def has_rank_sweep(rows: list[dict[str, Any]]) -> bool:
    ranks = defaultdict(set)
    for r in rows:
        ranks[(r["model"], r["suite"], r["method_name"])].add(r["rank"])
    return any(len(v) > 1 for v in ranks.values())


def plot_rank_sweep(rows: list[dict[str, Any]], path: Path) -> None:
    """One line per method (and steps; and lr when no validation split chose one) across ranks."""
    chosen = choose_lr(group_rows(rows)) is not None
    groups = _plot_groups(rows)
    fig, panels = _panels(groups, "eval exact match against expert rank")
    for key, ax, mine in panels:
        series: dict[tuple, list[Group]] = defaultdict(list)
        for g in mine:
            series[(g.method_name, g.steps, None if chosen else g.lr)].append(g)
        many_steps = len({s for _, s, _ in series}) > 1
        many_lrs = len({lr for _, _, lr in series}) > 1
        for (name, steps, lr), points in sorted(series.items(), key=lambda item: str(item[0])):
            points.sort(key=lambda g: g.rank)
            ax.errorbar(
                [g.rank for g in points],
                [100 * g.mean() for g in points],
                yerr=[100 * (g.std() or 0) for g in points],
                marker="o",
                capsize=3,
                label=name + (f" {steps} st" if many_steps else "") + (f" lr {lr:g}" if many_lrs else ""),
            )
        _ylim(ax, [100 * (g.mean() + (g.std() or 0)) for g in mine])
        ax.set_xscale("log", base=2)
        ranks = sorted({g.rank for g in mine})
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        ax.set_xlabel("expert rank (r̄ for MALoRA)")
        ax.set_ylabel("exact match %")
        ax.set_title(f"{key[0]} / {key[1]}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_params(rows: list[dict[str, Any]], path: Path) -> None:
    groups = _plot_groups(rows)
    fig, panels = _panels(groups, "trainable parameters against eval exact match")
    for _key, ax, mine in panels:
        for name in sorted({g.method_name for g in mine}):
            pts = [g for g in mine if g.method_name == name]
            ax.errorbar(
                [g.percent for g in pts],
                [100 * g.mean() for g in pts],
                yerr=[100 * (g.std() or 0) for g in pts],
                fmt="o",
                capsize=3,
                label=name,
            )
        _ylim(ax, [100 * (g.mean() + (g.std() or 0)) for g in mine])
        ax.set_xlabel("trainable parameters, % of base")
        ax.set_ylabel("exact match %")
        ax.set_title(f"{_key[0]} / {_key[1]}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def write_report(out: str | Path) -> list[Path]:
    """Write ``results.md`` and the plots into ``out``; return the paths written."""
    out = Path(out)
    rows = read_results(out / RESULTS)
    if not rows:
        raise MaloraError(f"{out}: no finished cells in {RESULTS} yet; nothing to report")
    plots = [out / "methods.png", out / "params_vs_accuracy.png"]
    plot_methods(rows, plots[0])
    plot_params(rows, plots[1])
    if has_rank_sweep(rows):
        plots.insert(1, out / "rank_sweep.png")
        plot_rank_sweep(rows, plots[1])
    text = render_markdown(rows, plots)
    atomic_write(out / REPORT, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return [out / REPORT, *plots]
