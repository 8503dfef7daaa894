"""Import a PEFT LoRA adapter directory as a malora-fx ``lora`` run directory.

PEFT writes ``adapter_config.json`` (``peft_type: "LORA"``, ``r``,
``lora_alpha``, ``target_modules``, ``use_rslora``) and
``adapter_model.safetensors`` with keys
``base_model.model.<fqn>.lora_A.weight`` [r, n] and ``...lora_B.weight`` [m, r].
The conversion keeps the update exactly: malora-fx's scale is
``alpha / r``, so PEFT's rsLoRA scale ``lora_alpha / sqrt(r)`` becomes
``alpha = lora_alpha · sqrt(r)``. The result is an ordinary run directory:
``malora-fx export`` merges and exports it like any other.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..adapters.files import CONFIG_FILE, FORMAT, WEIGHTS_FILE
from ..errors import AdapterFileError
from ..fileio import atomic_directory

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<fqn>.+)\.lora_(?P<part>[AB])(?:\.default)?\.weight$")


def is_peft_dir(directory: str | Path) -> bool:
    path = Path(directory) / CONFIG_FILE
    try:
        return "peft_type" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def convert_peft(peft_dir: str | Path, out_dir: str | Path, base_model: str) -> Path:
    """Write a malora-fx ``lora`` run directory equivalent to a PEFT LoRA adapter."""
    peft_dir, out_dir = Path(peft_dir), Path(out_dir)
    if not is_peft_dir(peft_dir):
        raise AdapterFileError(f'{peft_dir}: no PEFT adapter_config.json (with "peft_type")')
    config = json.loads((peft_dir / CONFIG_FILE).read_text())
    if config.get("peft_type") != "LORA":
        raise AdapterFileError(f"{peft_dir}: peft_type {config.get('peft_type')!r} is not supported; allowed: LORA")
    weights = peft_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterFileError(f"{peft_dir}: no {WEIGHTS_FILE} (pickled adapter_model.bin is never loaded)")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise AdapterFileError(f"{peft_dir}: per-module {key} is not supported")
    if config.get("use_dora"):
        raise AdapterFileError(f"{peft_dir}: DoRA adapters are not supported")
    tensors, sites = _convert_tensors(load_file(str(weights)), peft_dir)
    rank = int(config["r"])
    alpha = float(config["lora_alpha"]) * (math.sqrt(rank) if config.get("use_rslora") else 1.0)
    ours = {
        "format": FORMAT,
        "base_model": base_model,
        "method": "lora",
        "num_experts": 8,
        "top_k": 2,
        "rank": rank,
        "shared_rank": None,
        "alpha": alpha,
        "beta": 1.0,
        "dropout": float(config.get("lora_dropout") or 0.0),
        "normalize_top_k": False,
        "aux_loss_coef": 0.0,
        "seed": 0,
        "targets": "re:" + "|".join(re.escape(f) for f in sites),
        "sites": sites,
        "imported_from": {
            "peft_dir": str(peft_dir.resolve()),
            "base_model_name_or_path": config.get("base_model_name_or_path"),
        },
    }
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(ours, indent=2) + "\n")
    return out_dir


def _convert_tensors(peft: dict, peft_dir: Path):
    tensors, sites = {}, {}
    for key, tensor in peft.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterFileError(f"{peft_dir}: unexpected tensor {key!r} (only lora_A / lora_B are supported)")
        fqn, part = match["fqn"], match["part"]
        tensors[f"{fqn}.{part}"] = tensor.contiguous()
    for key in sorted(tensors):
        fqn, part = key.rsplit(".", 1)
        if part == "A":
            b = tensors.get(f"{fqn}.B")
            if b is None:
                raise AdapterFileError(f"{peft_dir}: {fqn} has lora_A but no lora_B")
            sites[fqn] = {"in_features": int(tensors[key].shape[1]), "out_features": int(b.shape[0])}
    return tensors, dict(sorted(sites.items()))
