"""Deprecated: moved to :mod:`kure_jax.quant.ptq` (the public names are also in ``kure_jax``)."""

from kure_jax._deprecation import moved_module

__getattr__ = moved_module("kure_jax.ptq", "kure_jax.quant.ptq")
