"""`MALoRAConfig`: the frozen, validated description of one adapter set.

One config describes every adapted site of a model. ``rank`` is the expert rank:
``r`` for LoRA / MoLoRA / HydraLoRA and ``r̄`` for MALoRA; ``shared_rank`` is
MALoRA's shared subspace rank ``d`` and is only meaningful for ``malora``.
Unset values resolve to the paper's defaults (see docs/method.md, 'Ranks and
defaults'): MALoRA r̄=12, d=32,
MoLoRA / HydraLoRA r=8, LoRA r=64, and ``alpha = 2 * rank`` (scale 2).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

METHODS = ("malora", "molora", "hydralora", "lora")
ROUTED_METHODS = ("malora", "molora", "hydralora")
DEFAULT_RANK = {"malora": 12, "molora": 8, "hydralora": 8, "lora": 64}
DEFAULT_SHARED_RANK = 32
ALL_LINEAR = "all-linear"
REGEX_PREFIX = "re:"
# A string holding one of these is a regular expression (PEFT's rule for a string);
# one made of names only (letters, digits, '_', '-', '.') separated by commas is a list of names.
REGEX_METACHARACTERS = frozenset("*+?()[]{}|^$\\")
TARGETS_ALLOWED = (
    "'all-linear', a list of module names such as ['q_proj', 'v_proj'] (or the string 'q_proj,v_proj'), "
    "or a regular expression ('re:<regex>', or any string with regex metacharacters)"
)


def parse_targets(spec: Any) -> str | tuple[str, ...]:
    """Normalise a target selection, with the meaning PEFT gives ``target_modules``.

    * ``"all-linear"`` (a string, or a list holding it): every linear layer but
      the output heads; other names in such a list are added to it.
    * a list (tuple, set) of names: a module is selected when its full name is
      one of them or ends with ``"." + name`` (``"q_proj"`` selects
      ``model.layers.0.self_attn.q_proj``).
    * a string with a regular-expression metacharacter (one of ``*+?()[]{}|^$\\``)
      or the prefix ``"re:"``: a regular expression matched with
      ``re.fullmatch`` against the full module name (PEFT's rule for a string).
    * any other string: comma-separated names, as a list (``"q_proj,v_proj"``);
      for a plain name this selects what PEFT's full match would, plus the
      same name deeper in the tree.

    Returns ``"all-linear"``, ``"re:<regex>"`` or a tuple of names; the result
    parses to itself.
    """
    if isinstance(spec, str):
        text = spec.strip()
        if text == ALL_LINEAR:
            return ALL_LINEAR
        if text.startswith(REGEX_PREFIX) or any(c in REGEX_METACHARACTERS for c in text):
            pattern = text[len(REGEX_PREFIX) :] if text.startswith(REGEX_PREFIX) else text
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"targets: invalid regular expression {pattern!r}: {exc}") from None
            if not pattern:
                raise ConfigError(f"targets: {spec!r} has an empty regular expression; allowed: {TARGETS_ALLOWED}")
            return REGEX_PREFIX + pattern
        names = [part.strip() for part in text.split(",")]
    elif isinstance(spec, (list, tuple, set, frozenset)):
        if not all(isinstance(part, str) for part in spec):
            raise ConfigError(f"targets: {spec!r} holds a non-string entry; allowed: {TARGETS_ALLOWED}")
        names = [part.strip() for part in (sorted(spec) if isinstance(spec, (set, frozenset)) else spec)]
        for name in names:
            if name.startswith(REGEX_PREFIX) or any(c in REGEX_METACHARACTERS or c == "," for c in name):
                raise ConfigError(
                    f"targets: list entry {name!r} is not a module name; a list holds names (PEFT's rule), "
                    "a regular expression is passed as a string such as 're:.*_proj'"
                )
    else:
        raise ConfigError(f"targets: {spec!r} is not allowed; allowed: {TARGETS_ALLOWED}")
    if not names or any(not name for name in names):
        raise ConfigError(f"targets: {spec!r} has an empty name; allowed: {TARGETS_ALLOWED}")
    if names == [ALL_LINEAR]:
        return ALL_LINEAR
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class MALoRAConfig:
    """How to adapt a model.

    Attributes:
        method: ``malora`` (default), ``molora``, ``hydralora`` or ``lora``.
        targets: PEFT's target_modules forms: ``"all-linear"`` (every linear
            site but output heads, also inside a list), a regular expression
            (``"re:<regex>"``, or any string with regex characters; full match
            on the module name) or module names matched as dotted suffixes
            (``"q_proj,v_proj"`` or ``["q_proj", "v_proj"]``).
        num_experts: N, experts per site (routed methods).
        top_k: experts kept per token, ``1 <= top_k <= num_experts``.
        rank: expert rank (r̄ for MALoRA, r otherwise); ``None`` = paper default.
        shared_rank: MALoRA's shared down-projection rank d; ``None`` = 32.
        alpha: scale numerator, ``s = alpha / rank``; ``None`` = ``2 * rank``.
        beta: MALoRA init balance: ``S_A = beta V_0``, ``P_t = (U_t Σ_t) / beta``.
        dropout: dropout probability on the adapter input, ``0 <= p < 1``.
        normalize_top_k: renormalise the kept top-k router probabilities.
        aux_loss_coef: weight of the load-balancing loss during training.
        seed: seed of the adapter initialisation (per site, order-independent).
    """

    method: str = "malora"
    targets: Any = ALL_LINEAR
    num_experts: int = dataclasses.field(default=8, metadata={"flag": "--experts"})
    top_k: int = 2
    # None is resolved to the method's default in __post_init__, so after construction these are always set.
    rank: int = None  # type: ignore[assignment]
    shared_rank: int | None = None
    alpha: float = None  # type: ignore[assignment]
    beta: float = 1.0
    dropout: float = 0.0
    normalize_top_k: bool = False
    aux_loss_coef: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method: unknown method {self.method!r}; allowed: {', '.join(METHODS)}")
        object.__setattr__(self, "targets", parse_targets(self.targets))
        _require_int("num_experts", self.num_experts, minimum=1)
        _require_int("top_k", self.top_k, minimum=1)
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"top_k: {self.top_k} is larger than num_experts={self.num_experts}; allowed: 1..{self.num_experts}"
            )
        rank = DEFAULT_RANK[self.method] if self.rank is None else self.rank
        _require_int("rank", rank, minimum=1)
        object.__setattr__(self, "rank", rank)
        if self.method == "malora":
            shared = DEFAULT_SHARED_RANK if self.shared_rank is None else self.shared_rank
            _require_int("shared_rank", shared, minimum=1)
            object.__setattr__(self, "shared_rank", shared)
        elif self.shared_rank is not None:
            raise ConfigError(
                f"shared_rank: {self.shared_rank} given for method {self.method!r}; "
                "shared_rank is only used by method 'malora'"
            )
        alpha = 2.0 * rank if self.alpha is None else float(self.alpha)
        if not alpha > 0:
            raise ConfigError(f"alpha: {self.alpha} must be > 0")
        object.__setattr__(self, "alpha", alpha)
        if not float(self.beta) > 0:
            raise ConfigError(f"beta: {self.beta} must be > 0")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"dropout: {self.dropout} is out of range; allowed: 0 <= dropout < 1")
        if not float(self.aux_loss_coef) >= 0.0:
            raise ConfigError(f"aux_loss_coef: {self.aux_loss_coef} must be >= 0")
        _require_int("seed", self.seed, minimum=0)

    @property
    def scale(self) -> float:
        """The adapter scale ``s = alpha / rank``."""
        return self.alpha / self.rank

    @property
    def routed(self) -> bool:
        """True for the mixture methods (they have a router)."""
        return self.method in ROUTED_METHODS

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``targets`` as written on the command line."""
        data = dataclasses.asdict(self)
        if isinstance(self.targets, tuple):
            data["targets"] = ",".join(self.targets)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str | None = None) -> MALoRAConfig:
        """Build a config from :meth:`to_dict` output.

        Unknown keys are an error naming the key (and ``source``, the file they came
        from, when given): a typo in a hand-edited config must not go unnoticed.
        Missing keys take their defaults.
        """
        if not isinstance(data, dict):
            where = f"{source}: " if source else ""
            raise ConfigError(f"{where}expected a JSON object of config fields, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in data if k not in names)
        if unknown:
            where = f"{source}: " if source else ""
            raise ConfigError(
                f"{where}unknown config key {unknown[0]!r}"
                + (f" (and {', '.join(map(repr, unknown[1:]))})" if len(unknown) > 1 else "")
                + f"; allowed: {', '.join(names)}"
            )
        return cls(**data)

    def replace(self, **changes: Any) -> MALoRAConfig:
        """A copy with some fields changed (re-validated); an unknown field name is an error."""
        data = self.to_dict()
        if "method" in changes and changes["method"] != self.method:
            for key in ("rank", "shared_rank", "alpha"):
                data[key] = None
        data.update(changes)
        return MALoRAConfig.from_dict(data)


def _require_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}: {value!r} is not allowed; expected an integer >= {minimum}")
