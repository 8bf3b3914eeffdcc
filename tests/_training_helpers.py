"""Helpers shared by the training- and eval-program tests."""

import contextlib
import importlib.util
import pathlib
import signal
import socket
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).parent.parent


def load_config(name, variant=None):
    """``get_config(variant)`` of ``configs/<name>.py``, loaded from its file."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)

@contextlib.contextmanager
def xla_optimizations_off():
    """Inside the block, XLA compiles without its optimisation passes
    (``jax_disable_most_optimizations``); the previous value is restored afterwards.

    For tests whose run time is compile time: every number such a test compares is computed
    under the same setting, so no assertion changes. A whole module uses the ``fast_compiles``
    fixture of conftest.py instead.
    """
    import jax

    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


# `python -c WITH_CTRL_C script.py args...` runs the script as __main__ with Python's own SIGINT
# handler, as under a terminal: a shell that starts pytest as a background job (no job control)
# makes it and its children ignore SIGINT, and the programs rightly keep an inherited "ignore".
WITH_CTRL_C = ("import runpy, signal, sys;"
               " signal.signal(signal.SIGINT, signal.default_int_handler);"
               " sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def interrupt_when(script, args, ready, *, env, timeout=120):
    """Runs ``script args`` (as under a terminal, see WITH_CTRL_C), sends Ctrl-C once ``ready()``
    is true (or after ``timeout`` seconds), and returns ``(exit code, stderr)``."""
    proc = subprocess.Popen([sys.executable, "-c", WITH_CTRL_C, str(script), *map(str, args)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stderr


def train_small_cnn(train, *, steps, seed=0):
    """A ``SmallCNN`` (features (8, 16), hidden 32, BatchNorm) trained ``steps`` Adam steps of
    64 random digits of ``train`` (an ``InMemory`` split with ``images``/``labels``).

    Returns ``(model, {"params", "batch_stats"})``.
    """
    import jax
    import numpy as np
    import optax

    from kure_jax.models.small import SmallCNN

    model = SmallCNN(num_classes=10, features=(8, 16), hidden=32)
    variables = model.init(jax.random.key(seed), train.images[:2])
    tx = optax.adam(3e-3)
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, stats, opt_state, images, labels):
        def loss_fn(p):
            logits, new = model.apply({"params": p, "batch_stats": stats}, images, train=True,
                                      mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, new["batch_stats"]

        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(train.labels), 64)
        params, stats, opt_state = step(params, stats, opt_state, train.images[idx],
                                        train.labels[idx])
    return model, {"params": params, "batch_stats": stats}


def free_port():
    """A TCP port of localhost that is free now (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(commands, logs, *, env, timeout):
    """Starts ``commands`` together (the processes of one distributed run), each writing to its
    log file, and waits for all; returns their exit codes. Output goes to files, not pipes: a
    process blocked on a full pipe would stall the others in their collectives."""
    procs = []
    for command, log in zip(commands, logs, strict=True):
        with open(log, "w") as out:
            procs.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=out,
                                          stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs]
