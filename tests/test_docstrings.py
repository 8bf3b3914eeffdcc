"""The examples in the public modules' docstrings run and print what they show."""

import doctest
import importlib

import pytest

MODULES = ["kure_jax.kernels", "kure_jax.kurtosis", "kure_jax.qat.config", "kure_jax.qat.layer",
           "kure_jax.qat.linen", "kure_jax.qat.nnx", "kure_jax.quant.formats",
           "kure_jax.quant.nested", "kure_jax.quant.ops", "kure_jax.quant.policy",
           "kure_jax.quant.ptq", "kure_jax.quant.quantizers", "kure_jax.selection",
           "kure_jax.theory"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name),
                             optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed"

