"""The public API stays the size docs/api.md says: each package's __all__ against its table row."""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest

API_PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "api.md"
ROW = re.compile(r"^\| `(kure_jax[\w.]*)` \| (\d+) \| (\d+) \|", re.MULTILINE)
TOTAL = re.compile(r"^\| \*\*total\*\* \| \*\*(\d+)\*\* \| \*\*(\d+)\*\* \|", re.MULTILINE)
PACKAGES = ["kure_jax", "kure_jax.quant", "kure_jax.qat", "kure_jax.kernels", "kure_jax.models",
            "kure_jax.data", "kure_jax.deploy", "kure_jax.evaluation", "kure_jax.training"]


def _table() -> dict[str, tuple[int, int]]:
    return {name: (int(count), int(budget))
            for name, count, budget in ROW.findall(API_PAGE.read_text())}


def test_every_public_package_has_a_row():
    on_disk = {f"kure_jax.{p.parent.name}" for p in
               (API_PAGE.parents[1] / "kure_jax").glob("*/__init__.py")
               if not p.parent.name.startswith("_")}
    assert set(_table()) == {"kure_jax", *on_disk} == set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_all_matches_the_documented_count_and_budget(package):
    count, budget = _table()[package]
    names = importlib.import_module(package).__all__
    assert len(names) == len(set(names)), names
    assert len(names) == count, f"{package}.__all__: {len(names)} names; docs/api.md: {count}"
    assert count <= budget, f"{package}: {count} public names, over its budget of {budget}"
    for name in names:  # every exported name exists
        assert hasattr(importlib.import_module(package), name), f"{package}.{name}"


def test_the_total_is_at_most_half_of_the_179_before_the_trim():
    total, budget = map(int, TOTAL.search(API_PAGE.read_text()).groups())
    assert total == sum(count for count, _ in _table().values())
    assert total <= budget <= 179 // 2


def test_qat_nnx_module_is_as_documented():
    from kure_jax.qat import nnx

    assert sorted(nnx.__all__) == ["QuantParam", "is_quantized", "quantize_model"]


def test_the_row_parser_reads_what_it_should():
    # Guards the parser itself: a row it cannot read would make the tests above vacuous.
    assert ROW.findall("| `kure_jax.x` | 3 | 4 | `a` |") == [("kure_jax.x", "3", "4")]
    assert len(_table()) == len(PACKAGES)
