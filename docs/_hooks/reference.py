"""MkDocs hook: the API reference pages, generated from the code at build time.

One page per public package (``kure_jax`` and every subpackage whose name has no leading
underscore), with one mkdocstrings entry per name in the package's ``__all__``, plus the modules
of ``PATH_MODULES`` (imported by path, as ``kure_jax.qat.nnx``) on their package's page. Nothing
is written to ``docs/``: the pages exist only in the build, so they follow the code as
``__all__`` changes. ``BENCHMARKS.md`` at the repository root becomes the page
``benchmarks.md`` the same way.

Two checks log a warning, which fails ``mkdocs build --strict``:

- after the build, every expected entry must appear in its page's HTML as the anchor
  mkdocstrings gives it (``id="kure_jax.penalty"``);
- every dotted ``kure_jax.…`` name that a hand-written page or the README mentions must exist,
  and one directly below a package must be in its ``__all__`` or be a module
  (``broken_references``).

``tests/test_docs_reference.py`` imports this module.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import pathlib
import pkgutil
import re
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parents[2]
ROOT_PACKAGE = "kure_jax"
REFERENCE_DIR = "reference"
NAV_TITLE = "API reference"

# Public modules that are imported by path rather than re-exported by their package (each is
# optional or heavy to import: flax.nnx, TensorFlow/LiteRT, ONNX Runtime, a command line); one
# that its package lists in __all__ is documented there instead.
PATH_MODULES = (
    "kure_jax.qat.nnx",
    "kure_jax.quant.formats",
    "kure_jax.deploy.format_export",
    "kure_jax.deploy.litert",
    "kure_jax.deploy.onnx_runtime",
    "kure_jax.models.convert",
)
_DOTTED = re.compile(r"(?<![\w/.-])kure_jax(?:\.\w+)+")
# `python -m kure_jax.deploy.export` and the like name a program, not an API entry.
_PROGRAM = re.compile(r"-m\s+kure_jax[\w.]*")

log = logging.getLogger("mkdocs.hooks.reference")


@dataclasses.dataclass(frozen=True)
class ReferencePage:
    """One package's reference page: the identifiers it documents and its Markdown."""

    package: str
    names: tuple[str, ...]  # the package's __all__, in its order
    path_modules: tuple[str, ...]  # PATH_MODULES of this package that are not in __all__
    modules: tuple[str, ...] = ()  # the names of names that are modules (``theory``)

    @property
    def src_uri(self) -> str:
        return f"{REFERENCE_DIR}/{self.package}.md"

    @property
    def identifiers(self) -> tuple[str, ...]:
        """Every identifier the page must hold an entry (an HTML anchor) for."""
        return tuple(f"{self.package}.{name}" for name in self.names) + self.path_modules

    def markdown(self) -> str:
        lines = [
            f"# `{self.package}`",
            "",
            f"::: {self.package}",
            "    options:",
            "      show_root_heading: false",
            "      members: false",
            "",
        ]
        for name in self.names:
            lines.append(f"::: {self.package}.{name}")
            if name in self.modules:  # a module shows its own __all__
                lines += ["    options:", "      filters: public"]
            lines.append("")
        if self.path_modules:
            lines += ["## Modules imported by path", ""]
            for module in self.path_modules:
                lines += [f"::: {module}", "    options:", "      filters: public", ""]
        return "\n".join(lines)


def _is_public(dotted: str) -> bool:
    return not any(part.startswith("_") for part in dotted.split("."))


def public_packages(root: str = ROOT_PACKAGE) -> list[str]:
    """``root`` and each of its subpackages, at any depth, with no underscore-named part."""
    package = importlib.import_module(root)
    found = [root]
    for info in pkgutil.walk_packages(package.__path__, f"{root}.", onerror=_raise):
        if info.ispkg and _is_public(info.name):
            found.append(info.name)
    return found


def _raise(name: str) -> None:
    raise ImportError(f"the API reference could not import {name}")


def reference_pages(root: str = ROOT_PACKAGE) -> list[ReferencePage]:
    """The reference pages of every public package, in package order.

    Raises:
      ValueError: if a public package has no ``__all__`` (its public names would be a guess).
    """
    pages = []
    for name in public_packages(root):
        module = importlib.import_module(name)
        names = getattr(module, "__all__", None)
        if names is None:
            raise ValueError(f"public package {name} has no __all__")
        path_modules = tuple(
            m for m in PATH_MODULES
            if m.rsplit(".", 1)[0] == name and m.rsplit(".", 1)[1] not in names
        )
        modules = tuple(n for n in names if isinstance(getattr(module, n), types.ModuleType))
        pages.append(ReferencePage(name, tuple(names), path_modules, modules))
    return pages


def resolve(dotted: str) -> object:
    """The object a dotted ``kure_jax.…`` name refers to (modules imported as needed).

    Raises:
      LookupError: if no module or attribute has that name.
    """
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                raise LookupError(f"{'.'.join(parts[:cut])} has no attribute {attr!r}")
            obj = getattr(obj, attr)
        return obj
    raise LookupError(f"no module {parts[0]!r}")


def broken_references(markdown: str, pages: list[ReferencePage]) -> list[str]:
    """The dotted ``kure_jax.…`` names in ``markdown`` that are broken references.

    Broken: a name that does not exist in the code, and a name directly below a public package
    (``kure_jax.evaluation.foo``) that is neither in the package's ``__all__`` (so not in the
    reference) nor a module. Deeper names (``kure_jax.selection.as_rule``, a pointer into a
    module, like a file path) only have to exist.
    """
    public = {page.package: set(page.names) for page in pages}
    problems = []
    for dotted in sorted(set(_DOTTED.findall(_PROGRAM.sub("", markdown)))):
        try:
            obj = resolve(dotted)
        except LookupError as error:
            problems.append(f"{dotted} (not in the code: {error})")
            continue
        package, _, name = dotted.rpartition(".")
        if (package in public and name not in public[package]
                and not isinstance(obj, types.ModuleType)):
            problems.append(f"{dotted} (not in {package}.__all__, so not in the API reference)")
    return problems


def missing_entries(page: ReferencePage, html: str) -> list[str]:
    """The page's identifiers that have no ``id="..."`` anchor in its built HTML."""
    return [ident for ident in page.identifiers if f'id="{ident}"' not in html]


# --- MkDocs events ---------------------------------------------------------------------------

_state: dict = {}


def on_config(config):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    pages = reference_pages()
    _state["pages"] = pages
    entries = [{page.package: page.src_uri} for page in pages]
    for item in config.nav or []:
        if isinstance(item, dict) and NAV_TITLE in item:
            item[NAV_TITLE] = entries
            break
    else:
        log.warning("mkdocs.yml's nav has no '%s' entry for the generated pages", NAV_TITLE)
    return config


def on_files(files, config):
    from mkdocs.structure.files import File

    for page in _state["pages"]:
        files.append(File.generated(config, page.src_uri, content=page.markdown()))
    # The README is not a page (docs/index.md includes parts of it): check its names here.
    for problem in broken_references((ROOT / "README.md").read_text(), _state["pages"]):
        log.warning("README.md names %s", problem)
    benchmarks = (ROOT / "BENCHMARKS.md").read_text()
    files.append(File.generated(config, "benchmarks.md", content=benchmarks))
    return files


def on_page_markdown(markdown, page, config, files):
    del config, files
    if not page.file.src_uri.startswith(f"{REFERENCE_DIR}/"):
        for problem in broken_references(markdown, _state["pages"]):
            log.warning("%s names %s", page.file.src_uri, problem)
    return markdown


def on_post_build(config):
    site = pathlib.Path(config.site_dir)
    directory_urls = config.use_directory_urls
    for page in _state["pages"]:
        stem = f"{REFERENCE_DIR}/{page.package}"
        html_path = site / (f"{stem}/index.html" if directory_urls else f"{stem}.html")
        missing = missing_entries(page, html_path.read_text())
        if missing:
            log.warning("%s has no reference entry for: %s", page.src_uri, ", ".join(missing))
