"""The README's "KURE in your own loop" programs run as written (extracted, not mirrored)."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _section_blocks(title: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end != -1 else None]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


OWN_LOOP_BLOCKS = _section_blocks("KURE in your own loop")


def test_the_section_has_the_three_programs():
    assert len(OWN_LOOP_BLOCKS) == 3
    assert "import flax.linen" in OWN_LOOP_BLOCKS[0]
    assert "linear_schedule" in OWN_LOOP_BLOCKS[1]
    assert "nnx.Optimizer" in OWN_LOOP_BLOCKS[2]


@pytest.mark.parametrize("index", range(len(OWN_LOOP_BLOCKS)), ids=["linen", "optax", "nnx"])
def test_own_loop_program_runs(index, capsys):
    namespace: dict = {}
    exec(compile(OWN_LOOP_BLOCKS[index], f"README.md block {index}", "exec"), namespace)
    params = namespace["params"]
    import jax
    import numpy as np

    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))
