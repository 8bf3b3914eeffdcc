"""kure_jax.data's own structure rules (the package-wide ones are in test_layout.py)."""

import os
import subprocess
import sys

import pytest
from test_layout import GRAPH, MODULES

PACKAGE = "kure_jax.data"
DATA = {name: set(deps) for name, deps in GRAPH.items() if name.startswith(PACKAGE)}


def test_the_interface_knows_no_implementation():
    assert DATA[f"{PACKAGE}.base"] == set()
    assert DATA[f"{PACKAGE}.in_memory"] == {f"{PACKAGE}.base"}
    registry_users = {name for name, deps in DATA.items() if f"{PACKAGE}.registry" in deps}
    assert registry_users == {PACKAGE}  # only the package re-exports it


@pytest.mark.slow
def test_importing_kure_jax_data_does_not_import_tensorflow():
    """Every module but ``preprocess`` (TensorFlow code throughout) imports TensorFlow lazily."""
    names = ", ".join(sorted(set(DATA) - {f"{PACKAGE}.preprocess"}))
    assert f"{PACKAGE}.registry" in MODULES and names
    code = (
        f"import sys, kure_jax, {names}; "
        "sys.exit(bool({'tensorflow', 'tensorflow_datasets'} & set(sys.modules)))"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0
