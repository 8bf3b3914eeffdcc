"""Helpers shared by the training- and eval-program tests."""

import importlib.util
import pathlib
import signal
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
