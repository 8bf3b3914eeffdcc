"""Ctrl-C (SIGINT) held back over blocks that must not be cut short."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Holds back Ctrl-C until the block is done, then raises ``KeyboardInterrupt``.

    Used around Orbax saves and waits (a ``KeyboardInterrupt`` inside them can leave Orbax's
    background threads waiting for each other: the process hangs instead of exiting) and
    around each train-step call (interrupted after the call donated its input state, the loop
    would hold no state to save). Acts only in the main thread and under Python's default
    handler; elsewhere the signal is not ours to handle and the block runs unchanged.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
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
