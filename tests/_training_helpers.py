"""Helpers shared by the training- and eval-program tests."""

import importlib.util
import pathlib

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
