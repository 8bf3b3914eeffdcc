"""Checks of sweep config values, shared by the families: each error names the config key."""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

from kure_jax.quant.ops import MAX_BITS, MIN_BITS

__all__ = ["as_dict", "bits", "bits_tuple", "boolean", "build", "integer", "positive",
           "unknown_key"]


def as_dict(config: Any) -> dict[str, Any]:
    """A ``ConfigDict`` or nested mapping as nested plain dicts."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if not isinstance(config, Mapping):
        raise ValueError(f"a sweep config must be a ConfigDict or mapping; got {type(config)}.")
    return {k: as_dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}


def unknown_key(key: str, allowed: Iterable[str], prefix: str = "") -> ValueError:
    """``unknown sweep key 'prefix.key'; closest: ...`` (the allowed keys closest first)."""
    allowed = sorted(allowed)
    close = difflib.get_close_matches(key, allowed, n=3, cutoff=0.0) or allowed
    return ValueError(f"unknown sweep key '{prefix}{key}'; closest: "
                      f"{', '.join(prefix + name for name in close)}.")


def build(cls: type, section: Any, name: str) -> Any:
    """``cls(**section)`` after checking that ``section`` (config ``name``) is a mapping of
    ``cls``'s fields.

    Raises:
      ValueError: for a section that is not a mapping or an unknown key (closest keys named).
    """
    if not isinstance(section, Mapping):
        raise ValueError(f"sweep key {name!r} must be a section (a ConfigDict); got {section!r}.")
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in section:
        if key not in fields:
            raise unknown_key(key, fields, f"{name}.")
    return cls(**as_dict(section))


def integer(value: Any, key: str, low: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"sweep key {key!r} must be an int >= {low}; got {value!r}.")
    return int(value)


def bits(value: Any, key: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not (
        MIN_BITS <= value <= MAX_BITS
    ):
        raise ValueError(f"sweep key {key!r} needs bit widths that are ints in "
                         f"[{MIN_BITS}, {MAX_BITS}]; got {value!r}.")
    return int(value)


def bits_tuple(values: Any, key: str) -> tuple[int, ...]:
    if isinstance(values, str | bytes) or not hasattr(values, "__iter__"):
        raise ValueError(f"sweep key {key!r} must be a tuple of bit widths; got {values!r}.")
    return tuple(bits(v, key) for v in values)


def boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"sweep key {key!r} must be True or False; got {value!r}.")
    return value


def positive(value: Any, key: str) -> float:
    """A finite real number > 0."""
    if (not isinstance(value, numbers.Real) or isinstance(value, bool)
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"sweep key {key!r} must be a finite number > 0; got {value!r}.")
    return float(value)


def setter(obj: Any) -> Any:
    """``set(name, value)`` on a frozen dataclass in its ``__post_init__``."""
    return lambda name, value: object.__setattr__(obj, name, value)
