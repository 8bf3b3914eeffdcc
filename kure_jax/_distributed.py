"""Multi-process start-up shared by the programs (``train.py`` and ``eval.py --distributed``)."""

from __future__ import annotations

import jax

__all__ = ["all_processes", "initialize"]


def initialize(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """``jax.distributed.initialize`` for one process of a multi-host run.

    On TPU pods and SLURM/MPI clusters JAX finds the coordinator itself (pass ``None``s);
    elsewhere give process 0's ``HOST:PORT``, the number of processes and this one's index.
    CPU processes (tests, CPU clusters) also get the gloo collectives backend, which GPU and
    TPU runs ignore.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


def all_processes(ok: bool) -> bool:
    """Whether ``ok`` holds on every process: a collective when there are several (every
    process must call it), ``ok`` itself in a single-process run."""
    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))
