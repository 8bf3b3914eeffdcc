"""Signals shared by the programs: Ctrl-C (SIGINT) and termination (SIGTERM).

Two tools: :func:`interrupts_deferred` holds a Ctrl-C back over a block that must not be cut
(an Orbax save, a train-step call that donates its input), and :class:`StopSignals` turns
SIGTERM/SIGINT into a request that a loop reads between steps (finish the step, save, exit).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["StopSignals", "interrupts_deferred", "sigint_is_ours", "signal_name"]

# interrupts_deferred blocks now running, and a second Ctrl-C that StopSignals held back for them.
_deferring = {"depth": 0, "pending": False}


def signal_name(signum: int) -> str:
    """``"SIGTERM"`` for ``signal.SIGTERM`` etc."""
    return signal.Signals(signum).name


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def sigint_is_ours() -> bool:
    """Whether this code may replace the SIGINT handler: only from the main thread (Python's
    rule) and over Python's default handler (not when the process was started with SIGINT
    ignored, e.g. under ``nohup``, nor over a handler someone else installed)."""
    return _main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Holds back Ctrl-C until the block is done, then raises ``KeyboardInterrupt``.

    Used around Orbax saves and waits (a ``KeyboardInterrupt`` inside them can leave Orbax's
    background threads waiting for each other: the process hangs instead of exiting) and
    around each train-step call (interrupted after the call donated its input state, the loop
    would hold no state to save). Acts only in the main thread and under Python's default
    handler or a :class:`StopSignals` (whose second Ctrl-C waits for the block); elsewhere the
    signal is not ours to handle and the block runs unchanged.
    """
    _deferring["depth"] += 1
    ours = sigint_is_ours()
    received = []
    if ours:
        signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        _deferring["depth"] -= 1
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        held = _deferring["pending"] and _deferring["depth"] == 0
        if held:
            _deferring["pending"] = False
        if received or held:
            raise KeyboardInterrupt


class StopSignals:
    """SIGTERM and SIGINT as a request to stop at the next step boundary.

    Inside ``with StopSignals() as stop:`` the first SIGTERM or SIGINT is recorded in
    :attr:`signum` instead of ending the process; the loop reads it between steps, saves and
    exits. A second SIGINT raises ``KeyboardInterrupt`` (after any :func:`interrupts_deferred`
    block), for an operator who does not want to wait. Handlers are installed only from the
    main thread and only over the default ones (an inherited "ignore", e.g. ``nohup``, stays).

    Args:
      sigterm: whether to handle SIGTERM. ``False`` in a multi-process JAX run, where
        ``jax.distributed`` has installed its own SIGTERM notifier (the preemption service that
        ``multihost_utils.reached_preemption_sync_point`` reads; Python cannot see it, so
        ``signal.getsignal`` still reports the default).
      forward_sigint_to_sigterm: also send SIGTERM to this process on the first SIGINT, so that
        JAX's preemption service hears a Ctrl-C too (multi-process runs).
    """

    def __init__(self, *, sigterm: bool = True, forward_sigint_to_sigterm: bool = False) -> None:
        self.signum: int | None = None
        self._sigterm = sigterm
        self._forward = forward_sigint_to_sigterm
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if not _main_thread():
            return self
        if self._sigterm and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.signum is None:
            self.signum = signum
            if self._forward and signum == signal.SIGINT:
                os.kill(os.getpid(), signal.SIGTERM)
            return
        if signum == signal.SIGINT:  # a second Ctrl-C: stop now, not at the next step
            if _deferring["depth"]:
                _deferring["pending"] = True
            else:
                raise KeyboardInterrupt
