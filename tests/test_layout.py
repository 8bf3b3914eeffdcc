"""The package's import structure: layers import only downward, no circles, no private reach-ins.

The layer order below is the architecture (README "Layout"); a new module gets a layer here.
Imports are read with ``ast`` (module level and inside functions alike), so a deferred import
counts as an import.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import kure_jax

ROOT = pathlib.Path(kure_jax.__file__).resolve().parent

# Bottom to top. A module may import its own layer (acyclically) and the layers below it.
LAYERS: list[tuple[str, ...]] = [
    ("kure_jax._axes", "kure_jax._arrays", "kure_jax._cli", "kure_jax._distributed",
     "kure_jax._interrupts", "kure_jax.theory"),
    # Backends only: the Pallas kernels and their dispatch settings, below the core that calls them.
    ("kure_jax.kernels",),
    ("kure_jax.selection",),
    ("kure_jax.kurtosis",),
    ("kure_jax.quant",),
    ("kure_jax.qat",),
    # The package root re-exports the core above; the layers below may use its public names.
    ("kure_jax",),
    ("kure_jax.models", "kure_jax.data"),
    ("kure_jax.training",),
    ("kure_jax.deploy",),
    ("kure_jax.evaluation",),
]


def _module_name(path: pathlib.Path) -> str:
    parts = ("kure_jax", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _is_module(name: str) -> bool:
    return name in MODULES


def _imports(name: str) -> list[tuple[str, str]]:
    """``(imported module, imported name or "")`` for every kure_jax import in module ``name``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.split(".")[0] == "kure_jax"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "kure_jax":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, "") if _is_module(sub) else (base, alias.name))
    return found


def _layer(name: str) -> int:
    best, depth = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = name == prefix or (prefix != "kure_jax" and name.startswith(prefix + "."))
            if matches and len(prefix) > depth:
                best, depth = index, len(prefix)
    if best is None:
        raise AssertionError(f"{name} has no layer in tests/test_layout.py LAYERS: add it.")
    return best


def _target_module(imported: str) -> str:
    while imported not in MODULES:
        imported = imported.rpartition(".")[0]
    return imported


GRAPH = {name: sorted({_target_module(m) for m, _ in _imports(name)} - {name})
         for name in MODULES}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_downward(name):
    upward = [dep for dep in GRAPH[name] if _layer(dep) > _layer(name)]
    assert not upward, f"{name} (layer {_layer(name)}) imports higher layers: {upward}"


def test_no_import_circles():
    visiting, done, cycles = [], set(), []

    def visit(node):
        if node in visiting:
            cycles.append([*visiting[visiting.index(node):], node])
            return
        if node in done:
            return
        visiting.append(node)
        for dep in GRAPH[node]:
            # A package's __init__ re-exporting its submodules is not a circle through them.
            if not node.startswith(dep + "."):
                visit(dep)
        visiting.pop()
        done.add(node)

    for name in sorted(GRAPH):
        visit(name)
    assert not cycles, f"import circles: {cycles}"


def _private_owner(imported: str, name: str) -> str | None:
    """The package that owns the first private component of ``imported.name``, if any."""
    parts = [*imported.split("."), *([name] if name else [])]
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_names_from_other_packages(name):
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    bad = []
    for imported, imported_name in _imports(name):
        owner = _private_owner(imported, imported_name)
        if owner is not None and not (package == owner or package.startswith(owner + ".")):
            bad.append(f"{imported}{'.' + imported_name if imported_name else ''}")
    assert not bad, f"{name} imports private names of other packages: {bad}"


def test_kernels_are_backends_below_the_core():
    # kure_jax.kernels imports only low-level helpers; the core calls the kernels, never back.
    outside = {dep for name in MODULES if name.startswith("kure_jax.kernels")
               for dep in GRAPH[name] if not dep.startswith("kure_jax.kernels")}
    assert outside <= {"kure_jax._arrays", "kure_jax._axes"}, outside
    users = {name for name, deps in GRAPH.items() if any(d.startswith("kure_jax.kernels")
                                                         for d in deps)}
    assert {"kure_jax.quant.ops", "kure_jax.quant.policy", "kure_jax.kurtosis"} <= users


def test_the_layer_check_would_catch_an_upward_import():
    # Guards the checker itself: the core importing the training package is refused.
    assert _layer("kure_jax.training.step") > _layer("kure_jax.kurtosis")
    assert _layer("kure_jax.kernels._moments") < _layer("kure_jax.kurtosis")
    assert _layer("kure_jax.kernels") < _layer("kure_jax.quant.ops")
    assert _private_owner("kure_jax.quant", "_check") == "kure_jax.quant"
    assert _private_owner("kure_jax.kernels._ops", "key_words") == "kure_jax.kernels"
