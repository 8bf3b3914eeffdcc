"""The documentation's programs run as written (extracted from the Markdown, not mirrored).

docs/own_loops.md holds three complete programs (Linen, optax, NNX); the README's quickstart is
the first of them, so it is checked to be the same text rather than run twice. Moved here from
tests/test_readme.py when the README's "KURE in your own loop" section became docs/own_loops.md.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks(path: pathlib.Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


OWN_LOOP_BLOCKS = _python_blocks(ROOT / "docs" / "own_loops.md")


def _readme_quickstart() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Quickstart")
    end = text.index("\n## ", start + 1)
    (block,) = re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)
    return block


def test_own_loops_page_has_the_three_programs():
    assert len(OWN_LOOP_BLOCKS) == 3
    assert "import flax.linen" in OWN_LOOP_BLOCKS[0]
    assert "linear_schedule" in OWN_LOOP_BLOCKS[1]
    assert "nnx.Optimizer" in OWN_LOOP_BLOCKS[2]


def test_readme_quickstart_is_the_tested_linen_program():
    assert _readme_quickstart() == OWN_LOOP_BLOCKS[0]


@pytest.mark.parametrize("index", range(len(OWN_LOOP_BLOCKS)), ids=["linen", "optax", "nnx"])
def test_own_loop_program_runs(index, capsys):
    namespace: dict = {}
    exec(compile(OWN_LOOP_BLOCKS[index], f"docs/own_loops.md block {index}", "exec"), namespace)
    params = namespace["params"]
    import jax
    import numpy as np

    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))
