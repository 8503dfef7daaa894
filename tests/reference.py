"""An independent eager reference of the formulas in docs/method.md, written token by token.

Nothing here uses malora_fx.adapters.layers: each update is computed straight from the
formulas with an explicit loop over tokens and chosen experts, then added to the
original (uncaptured) model's linear outputs with forward hooks.
"""

from __future__ import annotations

import contextlib

import torch


def reference_update(
    method: str, t: dict[str, torch.Tensor], x: torch.Tensor, *, top_k: int, scale: float, normalize: bool
) -> torch.Tensor:
    """Δy for every token of ``x`` ([..., n]) from the file tensors ``t`` of one site."""
    flat = x.reshape(-1, x.shape[-1]).double()
    t = {k: v.double() for k, v in t.items()}
    m = t["B"].shape[-2]
    rows = []
    for token in flat:
        if method == "lora":
            rows.append(scale * (t["B"] @ (t["A"] @ token)))
            continue
        probs = torch.softmax(t["router"] @ token, dim=0)
        values, experts = torch.topk(probs, top_k)
        if normalize:
            values = values / values.sum()
        delta = torch.zeros(m, dtype=torch.float64)
        for gate, e in zip(values, experts, strict=True):
            if method == "malora":
                low = t["P"][e] @ (t["S"] @ token)
            elif method == "molora":
                low = t["A"][e] @ token
            elif method == "hydralora":
                low = t["A"] @ token
            else:
                raise ValueError(method)
            delta = delta + gate * (t["B"][e] @ low)
        rows.append(scale * delta)
    return torch.stack(rows).reshape(*x.shape[:-1], m).to(x.dtype)


@contextlib.contextmanager
def hooked_reference(
    model: torch.nn.Module,
    site_tensors: dict[str, dict[str, torch.Tensor]],
    *,
    method: str,
    top_k: int,
    scale: float,
    normalize: bool,
):
    """Within the block, ``model``'s adapted modules return ``y + reference Δy``."""
    handles = []
    for fqn, tensors in site_tensors.items():

        def hook(module, inputs, output, tensors=tensors):
            return output + reference_update(method, tensors, inputs[0], top_k=top_k, scale=scale, normalize=normalize)

        handles.append(model.get_submodule(fqn).register_forward_hook(hook))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
