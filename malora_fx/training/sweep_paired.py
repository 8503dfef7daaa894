"""Paired differences for the sweep report: method against method on the same seeds.

Two cells of one seed share the training data order, the eval examples and the adapters' random
init seed, so much of what moves one method's exact match from seed to seed moves the other's too.
The difference taken seed by seed, then averaged, is the comparison a few seeds can support; its
sample std says how steady the gap is (compare it with the per-method std of the chosen table).
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sweep_report import Group

__all__ = ["paired_difference", "paired_tables"]

MIN_SEEDS = 2  # a pair with fewer common seeds has no spread to show; its cell stays empty


def _label(group: Group, ranks_per_method: Counter[str]) -> str:
    """The method label, with the rank when the table holds that method at several ranks."""
    return f"{group.method_name} r{group.rank}" if ranks_per_method[group.method_name] > 1 else group.method_name


def paired_difference(a: Group, b: Group) -> tuple[float, float, int] | None:
    """Eval exact match of ``a`` minus ``b`` on the seeds both ran: (mean, sample std, seeds), or None
    when they share fewer than two seeds."""
    scores_b = {r["seed"]: r["eval"]["exact_match"] for r in b.rows}
    diffs = [r["eval"]["exact_match"] - scores_b[r["seed"]] for r in a.rows if r["seed"] in scores_b]
    if len(diffs) < MIN_SEEDS:
        return None
    return statistics.fmean(diffs), statistics.stdev(diffs), len(diffs)


def _cell(found: tuple[float, float, int] | None) -> str:
    if found is None:
        return ""
    mean, std, seeds = found
    return f"{round(100 * mean, 1) + 0.0:+.1f} ± {100 * std:.1f} ({seeds})"  # + 0.0: no "-0.0"


def paired_tables(groups: list[Group]) -> list[str]:
    """Markdown: per model × suite × steps with some pair of groups sharing two seeds or more, a matrix of
    row minus column eval EM points, mean ± sample std over the seeds both ran (their number in
    parentheses). ``groups`` are the chosen ones (one lr per setting). Empty when no pair qualifies."""
    lines: list[str] = []
    for key in sorted({(g.model, g.suite, g.steps) for g in groups}):
        these = sorted((g for g in groups if (g.model, g.suite, g.steps) == key), key=lambda g: (g.method_name, g.rank))
        pairs = {(i, j): paired_difference(a, b) for i, a in enumerate(these) for j, b in enumerate(these) if i != j}
        if not any(pairs.values()):
            continue
        ranks = Counter(g.method_name for g in these)
        labels = [_label(g, ranks) for g in these]
        lines += [f"### {key[0]} / {key[1]} / {key[2]} steps: row − column, eval EM points", ""]
        lines += ["| row − column | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
        for i, label in enumerate(labels):
            cells = ["–" if i == j else _cell(pairs[i, j]) for j in range(len(these))]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines
