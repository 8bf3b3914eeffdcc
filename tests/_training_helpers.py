"""Helpers shared by the training-program tests (test_training, test_sharding, test_checkpoint)."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).parent.parent


def load_config(name, variant=None):
    """``get_config(variant)`` of ``configs/<name>.py``, loaded from its file."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)
