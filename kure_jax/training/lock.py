"""One training job per workdir: ``WORKDIR/train.lock`` names the job that holds it.

Two jobs on one workdir (a requeued job while the old one still runs) delete each other's
unfinished Orbax saves and interleave their ``metrics.jsonl`` records. The lock file, created
exclusively at start-up and removed at exit, holds the holder's host, pid, start time and
command. A lock left by a process that died on this host (its pid is gone) is taken over with a
warning; a live holder, or one on another host (whose pid cannot be checked from here), stops
the new job unless it is started with ``force=True`` (``train.py --force_unlock``).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import sys
import time
from typing import Any

from absl import logging

__all__ = ["LOCK_NAME", "WorkdirLock", "WorkdirLockedError"]

LOCK_NAME = "train.lock"


class WorkdirLockedError(RuntimeError):
    """Another job holds the workdir; the message names it and the override, in one line."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')} (started "
            f"{holder.get('started')}: {holder.get('command', '?')})")


class WorkdirLock:
    """The lock of one workdir; a context manager that takes it and releases it.

    Args:
      workdir: the run's directory (created if missing).
      force: take the lock even from a live holder or one on another host.

    Raises (on entering):
      WorkdirLockedError: if another live job holds the lock, or the lock file is unreadable;
        the message names the holder and ``--force_unlock``.
    """

    def __init__(self, workdir: str | pathlib.Path, *, force: bool = False) -> None:
        self.path = pathlib.Path(workdir) / LOCK_NAME
        self._force = force
        self._mine = {"host": socket.gethostname(), "pid": os.getpid(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "command": " ".join(sys.argv)}
        self._held = False

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _take_over_reason(self, holder: dict[str, Any] | None) -> str | None:
        """Why the existing lock may be replaced, or None if it may not."""
        if self._force:
            return "--force_unlock"
        if holder is None:
            return None
        same_host = holder.get("host") == self._mine["host"]
        pid = holder.get("pid")
        if same_host and isinstance(pid, int) and (pid == os.getpid() or not _pid_alive(pid)):
            return "its process is gone"
        return None

    def __enter__(self) -> WorkdirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a holder may release, or a rival take over, in between
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder == {}:  # released meanwhile
                    continue
                reason = self._take_over_reason(holder)
                if reason is None:
                    who = (_describe(holder) if holder is not None
                           else f"an unreadable lock file {self.path}")
                    raise WorkdirLockedError(
                        f"workdir {self.path.parent} is in use by {who}; wait for that job to end "
                        f"or stop it, or if it is gone rerun with --force_unlock (removes "
                        f"{self.path})."
                    ) from None
                logging.warning("Taking over the lock of %s from %s: %s.", self.path.parent,
                                _describe(holder or {}), reason)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as out:
                json.dump(self._mine, out)
            self._held = True
            return self
        raise WorkdirLockedError(f"could not take the lock {self.path}: it keeps changing hands.")

    def __exit__(self, *exc_info: object) -> None:
        if self._held and self._holder() == self._mine:  # not if someone forced it away
            self.path.unlink(missing_ok=True)
        self._held = False
