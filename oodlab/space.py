"""Search spaces as data: categorical, integer and (log-)float dimensions.

A study file declares its paper's space and grid as ``{config_key: Dimension}``; the
runner turns them into Optuna suggestions (``DefineByRun``) or an exact grid
(``grid_values``). ``--space KEY=SPEC`` and ``--set KEY=VALUE`` are parsed here, typed
by the method's config dataclass, so a bad key or spec fails before any compute.

SPEC syntax: ``a,b,c`` categorical; ``lo..hi`` float; ``lo..hi:log`` log-float;
``lo..hi:int`` integer (``lo..hi:int:log`` both).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union


class SpaceError(ValueError):
    """A space, spec or value that cannot be used; raised before any compute."""


@dataclass(frozen=True)
class Categorical:
    values: tuple[Any, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", tuple(self.values))
        if not self.values:
            raise SpaceError("a categorical dimension needs at least one value")

    def suggest(self, trial: Any, key: str) -> Any:
        return trial.suggest_categorical(key, list(self.values))

    def grid(self, key: str) -> list[Any]:
        return list(self.values)

    def ends(self) -> list[Any]:
        return list(self.values)

    def __str__(self) -> str:
        return ",".join(str(v) for v in self.values)


@dataclass(frozen=True)
class IntRange:
    lo: int
    hi: int
    log: bool = False

    def __post_init__(self) -> None:
        _check_range(self.lo, self.hi, self.log)

    def suggest(self, trial: Any, key: str) -> int:
        return int(trial.suggest_int(key, self.lo, self.hi, log=self.log))

    def grid(self, key: str) -> list[int]:
        return list(range(self.lo, self.hi + 1))

    def ends(self) -> list[int]:
        return [self.lo, self.hi]

    def __str__(self) -> str:
        return f"{self.lo}..{self.hi}:int" + (":log" if self.log else "")


@dataclass(frozen=True)
class FloatRange:
    lo: float
    hi: float
    log: bool = False

    def __post_init__(self) -> None:
        _check_range(self.lo, self.hi, self.log)

    def suggest(self, trial: Any, key: str) -> float:
        return float(trial.suggest_float(key, self.lo, self.hi, log=self.log))

    def grid(self, key: str) -> list[float]:
        raise SpaceError(f"{key}={self}: the grid sampler needs a list of values, e.g. --space {key}="
                         f"{self.lo:g},{(self.lo + self.hi) / 2:g},{self.hi:g}")

    def ends(self) -> list[float]:
        return [self.lo, self.hi]

    def __str__(self) -> str:
        return f"{self.lo:g}..{self.hi:g}" + (":log" if self.log else "")


Dimension = Categorical | IntRange | FloatRange
Space = dict[str, Dimension]


def _check_range(lo: float, hi: float, log: bool) -> None:
    if not lo < hi:
        raise SpaceError(f"range {lo}..{hi}: lo must be below hi")
    if log and lo <= 0:
        raise SpaceError(f"range {lo}..{hi}:log: a log range needs lo > 0")


def as_space(space: dict[str, Any]) -> Space:
    """A space from dimensions or plain lists (lists become categorical)."""
    return {k: v if isinstance(v, (Categorical, IntRange, FloatRange)) else Categorical(tuple(v))
            for k, v in space.items()}


def scalar(text: str) -> Any:
    """Untyped value: int, float, true/false, none, else the string."""
    t = text.strip()
    low = t.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t


def parse_dimension(spec: str) -> Dimension:
    """``a,b,c`` | ``lo..hi`` | ``lo..hi:log`` | ``lo..hi:int`` (values untyped; see ``typed``)."""
    if ".." not in spec:
        values = [scalar(v) for v in spec.split(",") if v.strip()]
        if not values:
            raise SpaceError(f"empty space spec {spec!r}")
        return Categorical(tuple(values))
    rng, *opts = spec.split(":")
    lo_s, _, hi_s = rng.partition("..")
    bad = [o for o in opts if o not in ("int", "log")]
    if bad:
        raise SpaceError(f"space spec {spec!r}: unknown option(s) {bad}; use :log and/or :int")
    try:
        if "int" in opts:
            ilo, ihi = int(lo_s), int(hi_s)
        else:
            flo, fhi = float(lo_s), float(hi_s)
    except ValueError:
        raise SpaceError(f"space spec {spec!r}: bounds must be numbers (int for :int)") from None
    return IntRange(ilo, ihi, log="log" in opts) if "int" in opts else FloatRange(flo, fhi, log="log" in opts)


def split_assignment(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise SpaceError(f"{flag} {text!r}: expected KEY=VALUE")
    return key.strip(), value.strip()


# ---------------------------------------------------------------- typing by the config dataclass


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> type of a config dataclass (resolved annotations)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _to_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise SpaceError(f"{key}: {value!r} is not true/false")


def _to_int(value: Any, key: str) -> int:
    try:
        f = float(str(value).strip())
    except ValueError:
        f = math.nan
    if isinstance(value, bool) or not f.is_integer():  # NaN is not an integer either
        raise SpaceError(f"{key}: {value!r} is not an integer")
    return int(f)


def _to_float(value: Any, key: str) -> float:
    try:
        return float(str(value).strip())
    except ValueError:
        raise SpaceError(f"{key}: {value!r} is not a number") from None


def _to_optional(tp: Any, value: Any, key: str) -> Any:
    """A union field (``int | None``): None for none/null where allowed, else the first member type that fits."""
    args = typing.get_args(tp)
    if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    for a in args:
        if a is type(None):
            continue
        try:
            return coerce(a, value, key)
        except SpaceError:
            continue
    raise SpaceError(f"{key}: {value!r} is not a {tp}")


_SCALARS: dict[Any, Callable[[Any, str], Any]] = {bool: _to_bool, int: _to_int, float: _to_float}


def coerce(tp: Any, value: Any, key: str) -> Any:
    """``value`` (a string or an untyped scalar) as the field type ``tp``; SpaceError if it is not one."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return _to_optional(tp, value, key)
    if tp in _SCALARS:
        return _SCALARS[tp](value, key)
    if tp is str or origin is tuple:  # tuples (e.g. ood) take their comma string
        return str(value).strip()
    return value


def typed(dim: Dimension, tp: Any, key: str) -> Dimension:
    """``dim`` checked against the field type: categorical values coerced, ranges on numeric fields."""
    if isinstance(dim, Categorical):
        return Categorical(tuple(coerce(tp, v, key) for v in dim.values))
    numeric = {a for a in (typing.get_args(tp) or (tp,)) if a is not type(None)}
    if isinstance(dim, IntRange) and not numeric & {int, float}:
        raise SpaceError(f"{key}: an integer range needs a numeric field, {key} is {tp}")
    if isinstance(dim, FloatRange) and float not in numeric:
        raise SpaceError(f"{key}: a float range needs a float field, {key} is {tp}; use lo..hi:int or a list")
    return dim


def grid_values(space: Space) -> dict[str, list[Any]]:
    """The exact grid of a space (every dimension must be enumerable)."""
    return {k: d.grid(k) for k, d in space.items()}


def grid_size(space: Space) -> int | None:
    """Number of grid points, or None when some dimension is a float range."""
    n = 1
    for d in space.values():
        if isinstance(d, FloatRange):
            return None
        n *= len(d.grid(""))
    return n


def describe(space: Space) -> str:
    return "  ".join(f"{k}={d}" for k, d in space.items()) or "(empty)"


@dataclass(frozen=True)
class DefineByRun:
    """Optuna define-by-run function over a space; a class so Ray's OptunaSearch can pickle it."""

    dims: tuple[tuple[str, Dimension], ...]

    @classmethod
    def of(cls, space: Space) -> DefineByRun:
        return cls(tuple(space.items()))

    def __call__(self, trial: Any) -> None:
        for key, dim in self.dims:
            dim.suggest(trial, key)
