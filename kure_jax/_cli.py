"""absl flags for the package's module command lines, one flag style everywhere (underscores).

``python -m kure_jax.models.convert`` and ``python -m kure_jax.deploy.export`` define their flags
in their own ``absl.flags.FlagValues``, so importing the library never adds flags to the global
``absl.flags.FLAGS`` of a program that imports it (train.py, eval.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import flags

__all__ = ["parse_flags"]

_HELP = ("-h", "--help", "--helpshort", "--helpfull")


def parse_flags(
    argv: Sequence[str] | None,
    define: Callable[[flags.FlagValues], None],
    *,
    prog: str,
    description: str,
) -> flags.FlagValues:
    """Parses ``argv`` with the flags that ``define`` adds to a fresh ``FlagValues``.

    Args:
      argv: the arguments without the program name (``None``: ``sys.argv[1:]``).
      define: adds the flags, e.g. ``flags.DEFINE_string(..., flag_values=fv)``.
      prog: the command, for the help text.
      description: one line for the help text.

    Returns:
      The parsed flags (``fv.name``).

    Raises:
      SystemExit: 0 after printing the help for ``--help``; 2 after one ``error:`` line on
        stderr for an unknown flag, a bad value, a missing required flag or a positional
        argument.
    """
    fv = flags.FlagValues()
    define(fv)
    args = list(sys.argv[1:] if argv is None else argv)
    if any(arg in _HELP for arg in args):
        print(f"usage: {prog} [flags]\n\n{description}\n\n{fv.get_help()}")
        raise SystemExit(0)
    try:
        rest = fv([prog, *args])
    except flags.Error as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if len(rest) > 1:
        print(f"error: unexpected arguments {rest[1:]}", file=sys.stderr)
        raise SystemExit(2)
    return fv
