"""kure_jax.data's module graph: imports only go downward, and no TensorFlow on import."""

import ast
import os
import pathlib
import subprocess
import sys

import kure_jax.data

PACKAGE = "kure_jax.data"
ROOT = pathlib.Path(kure_jax.data.__file__).parent


def module_name(path):
    relative = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in relative.parts if p != "__init__"]
    return ".".join([PACKAGE, *parts])


def imports_of(path):
    """Every kure_jax module ``path`` imports, at the top, in functions or for type checking."""
    modules = {module_name(p) for p in ROOT.rglob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return {name for name in found if name.startswith("kure_jax")}


def graph():
    return {module_name(p): imports_of(p) for p in sorted(ROOT.rglob("*.py"))}


def test_data_modules_import_each_other_without_a_cycle():
    edges = {name: {d for d in deps if d.startswith(PACKAGE)} for name, deps in graph().items()}
    done, active = set(), []

    def visit(name):
        assert name not in active, f"import cycle: {' -> '.join([*active, name])}"
        if name in done:
            return
        active.append(name)
        for dep in sorted(edges.get(name, ())):
            visit(dep)
        active.pop()
        done.add(name)

    for name in edges:
        visit(name)


def test_the_interface_knows_no_implementation():
    edges = graph()
    assert edges[f"{PACKAGE}.base"] == set()
    assert edges[f"{PACKAGE}.in_memory"] == {f"{PACKAGE}.base"}
    registry_users = {name for name, deps in edges.items() if f"{PACKAGE}.registry" in deps}
    assert registry_users == {PACKAGE}  # only the package re-exports it


def test_no_private_names_from_other_packages():
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kure_jax"):
                inside = node.module == PACKAGE or node.module.startswith(f"{PACKAGE}.")
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert inside or not private, f"{path.name} imports {private} from {node.module}"


def test_importing_kure_jax_data_does_not_import_tensorflow():
    """Every module but ``preprocess`` (TensorFlow code throughout) imports TensorFlow lazily."""
    names = ", ".join(sorted(set(graph()) - {f"{PACKAGE}.preprocess"}))
    code = (
        f"import sys, kure_jax, {names}; "
        "sys.exit(bool({'tensorflow', 'tensorflow_datasets'} & set(sys.modules)))"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0
