"""Per-task expert load of every routed site, and its heatmap.

For each task, the eval examples run through the adapted model; at every
routed site the router's top-k choices over real (non-padding) tokens are
counted (examples tokenised as in training, by
:func:`~malora_fx.training.data.encode`). ``load[task][site][t]`` is the fraction of the task's tokens that
chose expert t (each row sums to ``top_k``). A collapsed router shows as one
bright column per site.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..adapters.layers import MixtureLayer
from ..adapters.transform import adapter_layers, set_adapters_training
from .data import Example, collate, encode, pad_id


@torch.no_grad()
def expert_load(
    gm, tokenizer, examples: Sequence[Example], *, max_length: int = 512, batch_size: int = 8, device: str = "cpu"
) -> dict[str, dict[str, list[float]]]:
    """``{task: {site: [fraction of tokens choosing expert t]}}`` over real tokens."""
    layers = {fqn: layer for fqn, layer in adapter_layers(gm).items() if isinstance(layer, MixtureLayer)}
    if not layers:
        raise ValueError("the adapters have no router (method 'lora'); there is no expert load to show")
    set_adapters_training(gm, False)
    pad = pad_id(tokenizer)
    sums: dict[str, dict[str, torch.Tensor]] = {}
    counts: dict[str, float] = {}
    by_task: dict[str, list[Example]] = {}
    for e in examples:
        by_task.setdefault(e.task, []).append(e)
    for task, items in sorted(by_task.items()):
        for start in range(0, len(items), batch_size):
            encoded = [encode(e, tokenizer, max_length) for e in items[start : start + batch_size]]
            batch = {k: v.to(device) for k, v in collate(encoded, pad).items()}
            gm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            for fqn, layer in layers.items():
                chosen, _, count = layer.router_sums(batch["attention_mask"])
                acc = sums.setdefault(task, {})
                acc[fqn] = acc.get(fqn, 0) + chosen.cpu()
            counts[task] = counts.get(task, 0.0) + float(batch["attention_mask"].sum())
    return {task: {fqn: (v / counts[task]).tolist() for fqn, v in per_site.items()} for task, per_site in sums.items()}


def plot_expert_load(load: dict[str, dict[str, list[float]]], path: str | Path) -> Path:
    """One heatmap per task (rows: sites, columns: experts) written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    tasks = list(load)
    sites = list(next(iter(load.values())))
    num_experts = len(next(iter(next(iter(load.values())).values())))
    height = max(3.0, 0.12 * len(sites) + 1.5)
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(1.2 + 0.35 * num_experts * len(tasks) + 2.5, height), squeeze=False, sharey=True
    )
    vmax = max(max(max(row) for row in per_site.values()) for per_site in load.values())
    for ax, task in zip(axes[0], tasks, strict=True):
        grid = torch.tensor([load[task][s] for s in sites])
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(num_experts))
    axes[0][0].set_yticks(range(len(sites)))
    axes[0][0].set_yticklabels([_short(s) for s in sites], fontsize=max(3, min(8, 400 // max(1, len(sites)))))
    fig.colorbar(image, ax=axes[0].tolist(), label="fraction of tokens routed")
    fig.suptitle("expert load per task and site")
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _short(fqn: str) -> str:
    return fqn.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "")
