"""What a run reports: the progress bar, ``metrics.jsonl`` and the loss plot.

* :class:`Progress`: one line on stderr, redrawn in place on a terminal, else
  a line per 5 % of the steps; tok/s counts every token read (prompt and
  response), the figure in brackets the response tokens the loss covers.
* :class:`MetricsFile`: ``metrics.jsonl``, one JSON object per line (a step's
  row, or the final ``{"step", "eval_loss"}`` row). :meth:`MetricsFile.until`
  returns the rows of steps ``<= step`` and, when asked, rewrites the file
  without the later ones (a resumed run drops what its checkpoint did not see);
  :meth:`MetricsFile.append` adds one row.
* :func:`plot_losses`: training loss (and aux loss, when any) against step,
  written atomically as a PNG.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"


class Progress:
    """A one-line progress bar on stderr (a line per 5 % when not a terminal)."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total, self.start, self.enabled = total, start, enabled
        self.began = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.every = max(1, total // 20)

    def update(self, step: int, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        done = step + 1
        elapsed = time.perf_counter() - self.began
        eta = elapsed / max(1, done - self.start) * (self.total - done)
        text = (
            f"step {done}/{self.total}  loss {row['loss']:.4f}  aux {row['aux_loss']:.4f}  "
            f"{row['tokens_per_s']:.0f} tok/s ({row.get('response_tokens_per_s', 0):.0f} in the loss)  "
            f"ETA {_clock(eta)}"
        )
        if self.tty:
            print("\r" + text, end="\n" if done == self.total else "", file=sys.stderr, flush=True)
        elif done % self.every == 0 or done == self.total:
            print(text, file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsFile:
    """``metrics.jsonl`` of a run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def until(self, step: int, *, rewrite: bool) -> list[dict[str, Any]]:
        """Rows of steps ``<= step``; with ``rewrite`` the file keeps only those."""
        if not self.path.exists():
            return []
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if "step" in r and r["step"] <= step]
        if rewrite:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")


def plot_losses(metrics: list[dict[str, Any]], path: Path) -> None:
    """Draw training loss (and aux loss) against step to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in metrics if "loss" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="LM loss (response tokens)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    aux = [r["aux_loss"] for r in rows]
    if any(aux):
        twin = ax.twinx()
        twin.plot([r["step"] for r in rows], aux, color="tab:orange", alpha=0.6, label="load-balancing loss")
        twin.set_ylabel("aux loss")
    # one legend for both axes: two legends (one per axis) overlapped in the same corner
    handles = [h for a in fig.axes for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles, [str(h.get_label()) for h in handles], loc="upper right")
    ax.set_title(f"training loss ({path.parent.name})")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
