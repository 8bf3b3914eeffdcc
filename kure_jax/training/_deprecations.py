"""Renamed public names: a module ``__getattr__`` that warns, then returns the new object."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["deprecated_getattr"]


def deprecated_getattr(
    module: str, renamed: Mapping[str, tuple[str, Any]]
) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for names that moved or were renamed.

    Args:
      module: the module's ``__name__`` (for the AttributeError of unknown names).
      renamed: ``{old name: (message, new object)}``; ``message`` says what to use instead.

    Returns:
      ``__getattr__(name)``: for an old name, a ``DeprecationWarning`` with its message, then
      the new object; for any other name, AttributeError as without it.
    """

    def __getattr__(name: str) -> Any:
        if name in renamed:
            message, value = renamed[name]
            warnings.warn(message, DeprecationWarning, stacklevel=2)
            return value
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
