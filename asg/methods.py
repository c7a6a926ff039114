"""The registry of compression methods: one place that knows which methods exist.

Each method registers its fitter next to its own config and module (`@register(SGConfig, "sg")` on
`fit_sg`); everything else asks here: `compress` for the fitter of a config, the checkpoint reader for
the config a plan records, and the CLI, `asg compare` and fine-tuning runs for a config built from
options and a budget (`config_from_options`). The contract a config meets is `asg.config.MethodConfig`.
This module imports nothing from asg.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

_CONFIGS: dict[str, type] = {}  # method name -> config class, in registration order
_FITTERS: dict[type, Callable] = {}


def register(config_class: type, *names: str) -> Callable[[Callable], Callable]:
    """Decorate the fitter of `config_class`, whose compressions are called `names`: `fitter(config, weight,
    name, progress, **kw)` returns a `CompressedEmbedding` for the (V, D) `weight` and its relative error."""
    def decorate(fitter: Callable) -> Callable:
        _FITTERS[config_class] = fitter
        for name in names:
            _CONFIGS[name] = config_class
        return fitter

    return decorate


def names() -> tuple[str, ...]:
    """Every registered method name ("asg", "sg", "lowrank", "int8", "int4" once the baselines are imported)."""
    return tuple(_CONFIGS)


def config_class(method: str) -> type:
    """The config class of a method name; ValueError listing the known ones."""
    if method not in _CONFIGS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(_CONFIGS)}")
    return _CONFIGS[method]


def fitter_for(config) -> Callable:
    """The fitter registered for a config's class; ValueError naming the accepted classes."""
    fitter = _FITTERS.get(type(config))
    if fitter is None:
        known = ", ".join(sorted(cls.__name__ for cls in _FITTERS))
        raise ValueError(f"config must be an asg.ASGConfig or a baseline config ({known}), got {type(config).__name__}")
    return fitter


def config_from_plan(plan: dict[str, Any]):
    """The config object a checkpoint's `asg` section records."""
    method = plan.get("method", "asg")
    if method not in _CONFIGS:
        raise ValueError(f"unknown compression method {method!r}; known methods are {sorted(_CONFIGS)}")
    try:
        return _CONFIGS[method].from_dict(plan.get("config", {}))
    except (TypeError, ValueError) as err:
        raise ValueError(f"the recorded {method} settings are not valid ({err}); the checkpoint is damaged") from None


#: k-means settings that commands pass to every method; a method without k-means ignores them.
SHARED_OPTIONS = ("niter", "seed", "backend", "kmeans")


def config_from_options(method: str, shape: tuple[int, int], *, budget: float | str | None = None,
                        by: str = "params", element_size: int = 4, strict: bool = True, **options):
    """The config of `method` for a (V, D) table from options (k, m, rank, targets, niter, ...; None means
    unset) and an optional `budget` ("1%", or a fraction of the dense table's parameters or, with
    `by="bytes"`, bytes of `element_size` per dense value). Each config class decides how
    (`MethodConfig.from_options`). An option the method does not take is a ValueError that names the
    methods taking it, unless `strict=False` (as `asg compare` passes ASG's m to every method) or it is
    one of the k-means settings every command passes."""
    fraction = parse_budget(budget) if isinstance(budget, str) else budget
    return config_class(method).from_options(method, *shape, budget=fraction, by=by, element_size=element_size,
                                             **accepted_options(method, options, strict=strict))


def accepted_options(method: str, options: dict[str, Any], *, strict: bool = True) -> dict[str, Any]:
    """The set (not None) options that `method`'s config takes; see `config_from_options` for the rest."""
    taken = _fields(config_class(method))
    accepted = {}
    for key, value in options.items():
        if value is None:
            continue
        if key in taken:
            accepted[key] = value
        elif strict and key not in SHARED_OPTIONS:
            owners = [name.upper() for name, other in _CONFIGS.items() if key in _fields(other)]
            raise ValueError(f"--{key} applies to {', '.join(dict.fromkeys(owners)) or 'no method'} only, "
                             f"not to --method {method}")
    return accepted


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def parse_budget(text: str) -> float:
    """'1%' or '0.01' -> 0.01; anything else is a ValueError that shows both forms."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ValueError(f"budget {text!r} is not a number; write a percentage such as 1% or a fraction such as 0.01") from None
    if not raw.endswith("%") and value >= 1:
        raise ValueError(f"budget {text!r} is ambiguous; write {raw}% for a percentage, or a fraction below 1")
    if not 0 < value < 1:
        raise ValueError(f"budget {text!r} must be between 0% and 100% of the dense table, e.g. 1%")
    return value


def largest(cost: Callable[[int], float], low: int, high: int, allowed: float) -> int | None:
    """The largest n in [low, high] with cost(n) <= allowed, for a non-decreasing cost; None if there is none."""
    if high < low or cost(low) > allowed:
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if cost(mid) <= allowed else (low, mid - 1)
    return low


@dataclass(frozen=True)
class Compression:
    """A compression asked for before the table's shape is known (a fine-tuning run, an experiment YAML):
    the method, an optional budget and the method's options, checked when made; `config_for(shape)` is the
    config for a table. Its dict form is flat: {"method": "asg", "k": 256, "m": 96} or {"method": "sg",
    "budget": "10%"}."""

    method: str = "asg"
    budget: float | str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        config_class(self.method)
        accepted_options(self.method, self.options)
        if isinstance(self.budget, str):
            parse_budget(self.budget)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Compression":
        data = dict(data)
        return cls(data.pop("method", "asg"), data.pop("budget", None), data)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **({} if self.budget is None else {"budget": self.budget}), **self.options}

    def config_for(self, shape: tuple[int, int], **overrides):
        """The method's config for a (V, D) table, with `overrides` (e.g. targets) on top of the options."""
        return config_from_options(self.method, shape, budget=self.budget, **{**self.options, **overrides})
