"""Module-level ``__getattr__`` for names whose home moved (optax's deprecation pattern)."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def moved_module(old: str, new: str) -> Callable[[str], Any]:
    """``__getattr__`` for the shim module ``old``: each attribute comes from ``new``, warned.

    Args:
      old: the dotted name of the module that used to hold the names, e.g. ``"kure_jax.ptq"``.
      new: the dotted name of their home now, e.g. ``"kure_jax.quant.ptq"``.

    Returns:
      A function to assign to the shim's ``__getattr__``; it raises ``AttributeError`` for a
      name that ``new`` does not have either.
    """

    def __getattr__(name: str) -> Any:
        target = importlib.import_module(new)
        if name.startswith("__") or not hasattr(target, name):
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(f"{old}.{name} moved to {new}.{name}; {old} will be removed.",
                      DeprecationWarning, stacklevel=2)
        return getattr(target, name)

    return __getattr__
