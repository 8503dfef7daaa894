"""The sweep spec (TOML or JSON) and its cells, for :mod:`malora_fx.training.sweep`.

A spec names the axes of a quality sweep: models × suites × seeds × methods ×
ranks × steps × learning rates. :func:`load_spec` reads and validates it
strictly: an unknown key or a bad value is one :class:`MaloraError` naming the
key (``methods.lora.rank``), the value and what is allowed. :func:`product`
expands a spec into its cartesian product (:mod:`.sweep_plan` cuts it when
``lr_search_seeds`` searches the lrs on the first seeds only); every
:class:`Cell` carries the validated ``MALoRAConfig`` and ``TrainArgs`` it runs
with and a stable :attr:`Cell.id` (readable slug + a digest of every setting
that reaches the cell), so a finished cell is recognised across runs and
machines.

Spec keys (top level): ``name``, ``models``, ``suites``, ``methods``,
``seeds``, ``lrs``, ``lr_search_seeds``, ``steps``, ``ranks``, ``targets``,
``data_seed`` and the tables ``train`` and ``eval``; see the README section
"Quality sweeps".
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters.config import ALL_LINEAR, DEFAULT_RANK, METHODS, MALoRAConfig
from ..errors import MaloraError
from .args import TrainArgs
from .suites import SUITES
from .sweep_values import as_int, as_list, as_number, as_str, check_keys, check_types, refusal

TOP_KEYS = (
    "name",
    "models",
    "suites",
    "methods",
    "seeds",
    "lrs",
    "lr_search_seeds",
    "steps",
    "ranks",
    "targets",
    "data_seed",
)
TABLES = ("train", "eval")
SUITE_KEYS = ("train", "eval", "validation")
METHOD_KEYS = (
    "method",
    "experts",
    "top_k",
    "rank",
    "shared_rank",
    "shared_rank_ratio",
    "alpha",
    "beta",
    "dropout",
    "normalize_top_k",
    "aux_loss_coef",
    "targets",
)
# TrainArgs fields a spec may set in [train]; steps, lr and seed are axes, the rest belong to the sweep.
TRAIN_KEYS = (
    "batch_size",
    "grad_accum",
    "weight_decay",
    "warmup_ratio",
    "max_length",
    "task_sampling",
    "device",
    "bf16",
    "max_grad_norm",
)
EVAL_KEYS = ("batch_size", "max_length", "max_new_tokens")


@dataclass(frozen=True)
class SuiteSpec:
    """A built-in suite and its examples per task (``validation`` = 0: no validation split)."""

    name: str
    train: int = 200
    eval: int = 20
    validation: int = 0

    @property
    def key(self) -> str:
        """The data folder name: the suite's examples depend on these numbers only."""
        return f"{self.name}-t{self.train}-v{self.validation}-e{self.eval}"


@dataclass(frozen=True)
class EvalSpec:
    batch_size: int = 16
    max_length: int = 512
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class SweepSpec:
    name: str
    models: tuple[str, ...]
    suites: tuple[SuiteSpec, ...]
    methods: dict[str, dict[str, Any]]  # label -> method fields as written (validated)
    seeds: tuple[int, ...]
    lrs: tuple[float, ...]
    steps: tuple[int, ...]
    ranks: tuple[int, ...] | None
    targets: Any
    data_seed: int
    train: dict[str, Any]
    eval: EvalSpec
    source: str = "spec"
    lr_search_seeds: int | None = None  # every lr on the first K seeds only; None: on every seed

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source")
        if self.lr_search_seeds is None:  # the spec.json of sweeps without the key stays as it was
            data.pop("lr_search_seeds")
        data["suites"] = {s.name: {k: getattr(s, k) for k in SUITE_KEYS} for s in self.suites}
        return data


@dataclass(frozen=True)
class Cell:
    """One point of the sweep: a model, a suite, a named method at one rank, steps, lr and seed."""

    model: str
    suite: SuiteSpec
    method_name: str
    config: MALoRAConfig
    train: TrainArgs
    eval: EvalSpec
    data_seed: int

    @property
    def seed(self) -> int:
        return self.train.seed

    def settings(self) -> dict[str, Any]:
        """Every setting that reaches the cell (JSON-ready); :attr:`id` is a digest of it."""
        return {
            "model": self.model,
            "suite": dataclasses.asdict(self.suite),
            "data_seed": self.data_seed,
            "method_name": self.method_name,
            "config": self.config.to_dict(),
            "train": dataclasses.asdict(self.train),
            "eval": dataclasses.asdict(self.eval),
        }

    @property
    def id(self) -> str:
        digest = hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:10]
        slug = (
            f"{Path(self.model).name[:32]}-{self.suite.name}-{self.method_name}-r{self.config.rank}"
            f"-st{self.train.steps}-lr{self.train.lr:g}-seed{self.seed}"
        )
        return re.sub(r"[^A-Za-z0-9._+-]+", "_", slug) + "-" + digest


# The type of each typed key of a method entry and of [train]: int (>= 1), float (a number), bool or str.
METHOD_TYPES: dict[str, type] = {
    "experts": int,
    "top_k": int,
    "rank": int,
    "shared_rank": int,
    "shared_rank_ratio": float,
    "alpha": float,
    "beta": float,
    "dropout": float,
    "normalize_top_k": bool,
    "aux_loss_coef": float,
}
TRAIN_TYPES: dict[str, type] = {
    "batch_size": int,
    "grad_accum": int,
    "weight_decay": float,
    "warmup_ratio": float,
    "max_length": int,
    "task_sampling": str,
    "device": str,
    "bf16": bool,
    "max_grad_norm": float,
}


def _targets(source: str, key: str, value: Any) -> Any:
    try:
        MALoRAConfig(method="lora", targets=value)
    except MaloraError as exc:
        raise MaloraError(f"{source}: {key}: {str(exc).removeprefix('targets: ')}") from None
    return value


def _suites(source: str, data: Any) -> tuple[SuiteSpec, ...]:
    if not isinstance(data, dict) or not data:
        raise refusal(source, "suites", data, f"expected a table of suites named {' or '.join(SUITES)}")
    suites = []
    for name, counts in data.items():
        if name not in SUITES:
            raise refusal(source, "suites", name, f"allowed suites: {', '.join(SUITES)}")
        check_keys(source, f"suites.{name}", counts, SUITE_KEYS)
        values = {k: as_int(source, f"suites.{name}.{k}", v, 0 if k == "validation" else 1) for k, v in counts.items()}
        suites.append(SuiteSpec(name, **values))
    return tuple(suites)


def _method(source: str, label: str, data: Any, ranks: tuple[int, ...] | None, targets: Any) -> dict[str, Any]:
    where = f"methods.{label}"
    check_keys(source, where, data, METHOD_KEYS)
    check_types(source, where, data, METHOD_TYPES)
    if "method" not in data:
        raise MaloraError(f"{source}: {where}: missing key 'method'; allowed methods: {', '.join(METHODS)}")
    if data["method"] not in METHODS:
        raise refusal(source, f"{where}.method", data["method"], f"allowed: {', '.join(METHODS)}")
    if ranks is not None and "rank" in data:
        raise MaloraError(f"{source}: {where}.rank: the top-level 'ranks' axis sets every method's rank; drop one")
    if "shared_rank" in data and "shared_rank_ratio" in data:
        raise MaloraError(f"{source}: {where}: give shared_rank or shared_rank_ratio, not both")
    if "shared_rank_ratio" in data:
        if data["method"] != "malora":
            raise MaloraError(f"{source}: {where}.shared_rank_ratio: only used by method 'malora'")
        as_number(source, f"{where}.shared_rank_ratio", data["shared_rank_ratio"])
    if "targets" in data:
        _targets(source, f"{where}.targets", data["targets"])
    for rank in ranks or (data.get("rank"),):
        method_config(source, label, data, rank=rank, seed=0, targets=targets)
    return dict(data)


def method_config(source: str, label: str, data: dict[str, Any], *, rank, seed: int, targets: Any) -> MALoRAConfig:
    """The ``MALoRAConfig`` of method entry ``label`` at ``rank`` (``None``: the entry's or the default)."""
    fields = {k: v for k, v in data.items() if k not in ("experts", "shared_rank_ratio", "targets")}
    if "experts" in data:
        fields["num_experts"] = data["experts"]
    if rank is not None:
        fields["rank"] = rank
    if "shared_rank_ratio" in data:
        rank = fields.get("rank") or DEFAULT_RANK["malora"]
        fields["shared_rank"] = max(1, round(float(data["shared_rank_ratio"]) * rank))
    if "num_experts" in fields:  # top_k's default 2 would exceed a single expert
        fields.setdefault("top_k", min(2, fields["num_experts"]))
    fields["targets"] = data.get("targets", targets)
    fields["seed"] = seed
    try:
        return MALoRAConfig(**fields)
    except MaloraError as exc:
        message = str(exc).replace("num_experts", "experts")
        raise MaloraError(f"{source}: methods.{label}: {message}") from None


def parse_spec(data: Any, source: str = "spec") -> SweepSpec:
    """Validate a spec already read into Python values (see the module docstring)."""
    check_keys(source, "", data, TOP_KEYS + TABLES)
    for key in ("models", "suites", "methods", "lrs", "steps"):
        if key not in data:
            raise MaloraError(f"{source}: missing key {key!r}; a spec needs models, suites, methods, lrs and steps")
    models = as_list(source, "models", data["models"], as_str)
    ranks = as_list(source, "ranks", data["ranks"], lambda s, k, v: as_int(s, k, v, 1)) if "ranks" in data else None
    targets = _targets(source, "targets", data.get("targets", ALL_LINEAR))
    methods_data = data["methods"]
    if not isinstance(methods_data, dict) or not methods_data:
        raise refusal(source, "methods", methods_data, "expected a table of named method entries ([methods.NAME])")
    methods = {str(label): _method(source, str(label), m, ranks, targets) for label, m in methods_data.items()}
    train = dict(check_keys(source, "train", data.get("train", {}), TRAIN_KEYS))
    check_types(source, "train", train, TRAIN_TYPES)
    try:
        TrainArgs(**train, steps=1, lr=1.0)
    except MaloraError as exc:
        message = str(exc)
        raise MaloraError(f"{source}: train{'.' if message.split(':')[0] in TRAIN_KEYS else ': '}{message}") from None
    eval_data = check_keys(source, "eval", data.get("eval", {}), EVAL_KEYS)
    eval_spec = EvalSpec(
        batch_size=as_int(source, "eval.batch_size", eval_data.get("batch_size", 16), 1),
        max_length=as_int(source, "eval.max_length", eval_data.get("max_length", train.get("max_length", 512)), 1),
        max_new_tokens=None
        if eval_data.get("max_new_tokens") is None
        else as_int(source, "eval.max_new_tokens", eval_data["max_new_tokens"], 1),
    )
    suites = _suites(source, data["suites"])
    seeds = as_list(source, "seeds", data.get("seeds", [0]), lambda s, k, v: as_int(s, k, v, 0))
    return SweepSpec(
        name=as_str(source, "name", data.get("name", Path(source).stem)),
        models=models,
        suites=suites,
        methods=methods,
        seeds=seeds,
        lrs=as_list(source, "lrs", data["lrs"], as_number),
        steps=as_list(source, "steps", data["steps"], lambda s, k, v: as_int(s, k, v, 1)),
        ranks=ranks,
        targets=targets,
        data_seed=as_int(source, "data_seed", data.get("data_seed", 0), 0),
        train=train,
        eval=eval_spec,
        source=source,
        lr_search_seeds=_lr_search_seeds(source, data.get("lr_search_seeds"), seeds, suites),
    )


def _lr_search_seeds(source: str, value: Any, seeds: tuple[int, ...], suites: tuple[SuiteSpec, ...]) -> int | None:
    """``lr_search_seeds``: 1 to len(seeds); below len(seeds), the later seeds' lr comes from a validation split."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= len(seeds):
        raise refusal(source, "lr_search_seeds", value, f"expected an integer from 1 to {len(seeds)} (the seeds)")
    no_validation = [s.name for s in suites if not s.validation]
    if value < len(seeds) and no_validation:
        raise refusal(
            source,
            "lr_search_seeds",
            value,
            f"the later seeds' lr is chosen on the validation split, and suite {no_validation[0]!r} has none "
            f"(set suites.{no_validation[0]}.validation)",
        )
    return value


def _read_toml(path: Path) -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise MaloraError(f"{path}: TOML specs need Python >= 3.11 or the tomli package; or use JSON") from None
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise MaloraError(f"{path}: not valid TOML: {exc}") from None


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a ``.toml`` or ``.json`` sweep spec."""
    path = Path(path)
    if not path.is_file():
        raise MaloraError(f"{path}: no such spec file")
    if path.suffix == ".toml":
        data = _read_toml(path)
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MaloraError(f"{path}: not valid JSON: {exc}") from None
    else:
        raise MaloraError(f"{path}: unknown spec format {path.suffix!r}; allowed: .toml, .json")
    return parse_spec(data, str(path))


def product(spec: SweepSpec) -> list[Cell]:
    """The cartesian product, model-major (one model loaded at a time), then suite, seed, steps, lr and
    rank, the methods innermost: a sweep stopped early (or the first round of ``--jobs`` shards) has
    every method at the first settings, side by side, rather than some methods at every setting. The
    order does not change a cell's id."""
    out = []
    ranks: tuple[int | None, ...] = spec.ranks or (None,)
    for model, suite, seed, steps, lr, rank, label in itertools.product(
        spec.models, spec.suites, spec.seeds, spec.steps, spec.lrs, ranks, spec.methods
    ):
        config = method_config(spec.source, label, spec.methods[label], rank=rank, seed=seed, targets=spec.targets)
        args = TrainArgs(**spec.train, steps=steps, lr=lr, seed=seed)
        out.append(Cell(model, suite, label, config, args, spec.eval, spec.data_seed))
    return out
