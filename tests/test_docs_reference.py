"""The documentation site's configuration: every public name has a reference entry, every page
is in the nav, and the build-time checks of docs/_hooks/reference.py can fail.

`make docs` (mkdocs build --strict) runs the same hook and also checks the built HTML; these tests
need neither mkdocs nor a build, so they run with the main suite.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_docs_{name}", DOCS / "_hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


hook = _load("reference")
docstrings = _load("griffe_docstrings")


@pytest.fixture(scope="module")
def pages():
    return hook.reference_pages()


def test_every_public_package_on_disk_has_a_page(pages):
    # Found from the files, not by the hook's own walk over imported packages.
    on_disk = {"kure_jax"} | {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "kure_jax").rglob("__init__.py")
        if not any(part.startswith("_") for part in init.parent.relative_to(ROOT).parts)
    }
    assert {page.package for page in pages} == on_disk


def test_every_name_in_every_all_has_an_entry(pages):
    for page in pages:
        markdown = page.markdown().splitlines()
        for name in importlib.import_module(page.package).__all__:
            assert f"::: {page.package}.{name}" in markdown, (page.package, name)


def test_path_modules_are_public_modules_on_their_package_page(pages):
    by_package = {page.package: page for page in pages}
    for module in hook.PATH_MODULES:
        package = module.rsplit(".", 1)[0]
        assert importlib.util.find_spec(module) is not None, module
        assert not any(part.startswith("_") for part in module.split(".")), module
        # documented once: as a name of the package's __all__ or as a path module
        lines = by_package[package].markdown().splitlines()
        assert lines.count(f"::: {module}") == 1, module
        assert module in by_package[package].identifiers


def test_missing_entries_names_an_entry_absent_from_the_html():
    page = hook.ReferencePage("kure_jax", ("penalty", "kurtosis"), ("kure_jax.qat.nnx",))
    assert page.identifiers == ("kure_jax.penalty", "kure_jax.kurtosis", "kure_jax.qat.nnx")
    html = '<h2 id="kure_jax.penalty">penalty</h2><h2 id="kure_jax.qat.nnx">nnx</h2>'
    assert hook.missing_entries(page, html) == ["kure_jax.kurtosis"]


def test_broken_references_flags_missing_and_unlisted_names():
    # A reference listing only two names of the top level, so that the real kure_jax.quantize
    # plays a name that exists but is missing from __all__.
    pages = [hook.ReferencePage("kure_jax", ("penalty", "qat"), ())]
    markdown = (
        "`kure_jax.penalty(params)` and `kure_jax.qat.nnx.quantize_model` (a module's "
        "function), run as `python -m kure_jax.models.convert`, are fine; "
        "`kure_jax.no_such_name` is not in the code and `kure_jax.quantize` is not listed."
    )
    problems = hook.broken_references(markdown, pages)
    assert [p.split(" ")[0] for p in problems] == ["kure_jax.no_such_name", "kure_jax.quantize"]
    assert "not in the code" in problems[0]
    assert "not in kure_jax.__all__" in problems[1]


def _nav_files(nav) -> list[str]:
    files = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        files += _nav_files(value) if isinstance(value, list) else [value]
    return files


def test_nav_lists_every_page_and_only_pages_that_exist():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = _nav_files(config["nav"])
    generated = {"benchmarks.md"}  # BENCHMARKS.md, added by the hook like the reference pages
    written = {
        str(path.relative_to(DOCS)) for path in DOCS.rglob("*.md")
        if not path.relative_to(DOCS).parts[0].startswith("_")
    }
    assert sorted(set(listed) - generated) == sorted(written)
    assert len(listed) == len(set(listed))
    assert (ROOT / "BENCHMARKS.md").is_file()
    assert any(hook.NAV_TITLE in item for item in config["nav"] if isinstance(item, dict))


def test_docstring_rewrites_read_napoleon_habits_as_markdown():
    text = "\n".join([
        "Sum, as :func:`~kure_jax.kurtosis.penalty` does with :class:`Moments`::",
        "",
        "    y = f(x)",
        "",
        ".. math::",
        "",
        "   L = \\sum_i x_i",
        "",
        ">>> f(1)",
        "['a'] ['b']",
        "",
        "Args:",
        "  x: the input.",
        "  where, axis: as in penalty,",
        "    over two lines.",
        "",
        "Returns:",
        "  y.",
    ])
    assert docstrings.rewrite(text).split("\n") == [
        "Sum, as `penalty` does with `Moments`:",
        "",
        "    y = f(x)",
        "",
        "$$",
        "L = \\sum_i x_i",
        "$$",
        "",
        "```pycon",
        ">>> f(1)",
        "['a'] ['b']",
        "```",
        "",
        "Args:",
        "  x: the input.",
        "  where: as in penalty,",
        "    over two lines.",
        "  axis: as in penalty,",
        "    over two lines.",
        "",
        "Returns:",
        "  y.",
    ]


def test_doctests_in_an_examples_section_are_left_to_griffe():
    text = "Examples:\n  >>> f(1)\n  2"
    assert docstrings.rewrite(text) == text
