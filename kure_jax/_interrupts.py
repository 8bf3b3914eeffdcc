"""Ctrl-C (SIGINT) shared by the programs: whose signal it is, blocks it must not cut."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


def sigint_is_ours() -> bool:
    """Whether this code may replace the SIGINT handler: only from the main thread (Python's
    rule) and over Python's default handler (not when the process was started with SIGINT
    ignored, e.g. under ``nohup``, nor over a handler someone else installed)."""
    return (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Holds back Ctrl-C until the block is done, then raises ``KeyboardInterrupt``.

    Used around Orbax saves and waits (a ``KeyboardInterrupt`` inside them can leave Orbax's
    background threads waiting for each other: the process hangs instead of exiting) and
    around each train-step call (interrupted after the call donated its input state, the loop
    would hold no state to save). Acts only in the main thread and under Python's default
    handler; elsewhere the signal is not ours to handle and the block runs unchanged.
    """
    if not sigint_is_ours():
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if received:
            raise KeyboardInterrupt
