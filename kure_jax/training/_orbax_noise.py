"""Drops the "Event loop is closed" tracebacks that a failed Orbax restore leaves behind.

Why this exists (orbax-checkpoint 0.12.8, tensorstore 0.1.86): when a TensorStore read fails
(a corrupted or truncated checkpoint), Orbax's ``run_sync`` closes its asyncio event loop as soon
as the first error reaches it, while TensorStore's native threads are still finishing the other
reads of the same restore. Each late completion calls ``loop.call_soon_threadsafe`` on the
closed loop; the ``RuntimeError("Event loop is closed")`` it raises has no Python caller, so
CPython hands it to :data:`sys.unraisablehook`, whose default prints a traceback on stderr.
They come before and after the restore's own exception escapes, up to interpreter exit (0 to 26
of them per failed restore of the corrupted checkpoint of ``tests/test_eval_cli.py``), and
carry nothing that exception does not say. No Orbax or TensorStore option avoids them, and
``absl`` logging levels do not apply (they are not log records).

Earlier versions redirected file descriptor 2 around the restore (and ``eval.py`` again before
exiting), which also hid unrelated output; this filter drops only these exceptions.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["drop_closed_loop_callbacks"]

_MESSAGE = "Event loop is closed"
_MARK = "_kure_jax_drops_closed_loop_callbacks"


def _is_closed_loop_callback(unraisable: Any) -> bool:
    """True for the RuntimeError of ``call_soon_threadsafe`` on a closed asyncio loop."""
    if unraisable.exc_type is not RuntimeError or str(unraisable.exc_value) != _MESSAGE:
        return False
    tb = unraisable.exc_traceback
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
            return True
        tb = tb.tb_next
    return False


def drop_closed_loop_callbacks() -> None:
    """Installs, once per process, a :data:`sys.unraisablehook` that drops those exceptions.

    Every other unraisable exception goes to the hook it replaces. It stays installed: the
    late callbacks of a failed restore can arrive at any time after it, even at exit.
    """
    previous = sys.unraisablehook
    if getattr(previous, _MARK, False):
        return

    def hook(unraisable: Any) -> None:
        if not _is_closed_loop_callback(unraisable):
            previous(unraisable)

    setattr(hook, _MARK, True)
    sys.unraisablehook = hook
