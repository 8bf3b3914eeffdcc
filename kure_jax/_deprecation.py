"""Module-level ``__getattr__`` for public names that moved or were renamed (optax's pattern).

The one deprecation helper of the package: every shim (``kure_jax.policy``, ``kure_jax.kernels``'
old entry points, the training package's renamed steps) warns through it, with a
``DeprecationWarning`` at the caller's line, and then returns the new object.

A lower layer's shim may have to return a name that now lives above it (``kure_jax.kernels``'
old ``penalty`` is ``kure_jax.kurtosis.penalty``): :class:`Lazy` names it by module and
attribute, imported on first access, so the shim adds no import edge to the layer graph
(``tests/test_layout.py``).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

__all__ = ["Lazy", "deprecated_getattr", "moved_module"]


class Lazy(NamedTuple):
    """The attribute ``name`` of the module ``module``, imported when first asked for."""

    module: str
    name: str

    def resolve(self) -> Any:
        """The attribute itself (imports ``module`` if needed)."""
        return getattr(importlib.import_module(self.module), self.name)


def deprecated_getattr(
    module: str, renamed: Mapping[str, tuple[str, Any]]
) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for names that moved or were renamed.

    Args:
      module: the module's ``__name__`` (for the AttributeError of unknown names).
      renamed: ``{old name: (message, new object)}``; ``message`` says what to use instead, and
        a :class:`Lazy` new object is resolved at each access.

    Returns:
      ``__getattr__(name)``: for an old name, a ``DeprecationWarning`` with its message, then
      the new object; for any other name, AttributeError as without it.
    """

    def __getattr__(name: str) -> Any:
        if name in renamed:
            message, value = renamed[name]
            _warn(message)
            return value.resolve() if isinstance(value, Lazy) else value
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


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
        _warn(f"{old}.{name} moved to {new}.{name}; {old} will be removed.")
        return getattr(target, name)

    return __getattr__


def _warn(message: str) -> None:
    # stacklevel 3: the line that read the attribute, above __getattr__ and this function.
    warnings.warn(message, DeprecationWarning, stacklevel=3)
