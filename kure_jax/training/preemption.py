"""Stopping a run on SIGTERM/SIGINT at a step every process agrees on (docs/interruptions.md).

One process: Python handlers (:class:`kure_jax._interrupts.StopSignals`) record the signal and
the loop stops after the step. Several: ``jax.distributed.initialize`` starts JAX's preemption
service, which owns SIGTERM on each process; the loop asks
``multihost_utils.reached_preemption_sync_point(step)`` after every step (as Orbax's
``CheckpointManager.reached_preemption`` does) and all processes stop at the step it names.
"""

from __future__ import annotations

import signal

import jax

from kure_jax._interrupts import StopSignals, signal_name

__all__ = ["RunStopped", "stop_signal", "stop_signals"]


class RunStopped(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped the run after a step, whose checkpoint was saved and waited for.

    A ``KeyboardInterrupt``, so code that stops on Ctrl-C stops on it; rerunning resumes from
    :attr:`step` exactly as if uninterrupted.

    Attributes:
      signum: the signal (``signal.SIGTERM`` also on the processes of a multi-process run that
        stopped because another one was signalled).
      step: the last step trained, saved as a checkpoint.
    """

    def __init__(self, signum: int, step: int) -> None:
        self.signum = signum
        self.step = step
        super().__init__(f"stopped by {signal_name(signum)} after step {step}")


def stop_signals() -> StopSignals | None:
    """How this process hears SIGTERM/SIGINT: ``None`` where it cannot stop in agreement.

    One process: Python handlers. Several: JAX's preemption service (started by
    ``jax.distributed.initialize``) owns SIGTERM and agrees on the stop step across processes;
    SIGINT is forwarded to it. Without that service the signals keep their default effect.
    """
    if jax.process_count() == 1:
        return StopSignals()
    # Not probed with a call: the sync point must be asked with the loop's steps only.
    if not jax.config.jax_enable_preemption_service:
        return None
    return StopSignals(sigterm=False, forward_sigint_to_sigterm=True)


def stop_signal(signals: StopSignals | None, step: int) -> int | None:
    """The signal to stop on after ``step`` (the same step on every process), or None."""
    if signals is None:
        return None
    if jax.process_count() == 1:
        return signals.signum
    from jax.experimental import multihost_utils

    if multihost_utils.reached_preemption_sync_point(step):
        return signals.signum or signal.SIGTERM
    return None
