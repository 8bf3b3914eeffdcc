"""Deprecated: moved to :mod:`kure_jax.quant.quantizers` (public names also in ``kure_jax``)."""

from kure_jax._deprecation import moved_module

__getattr__ = moved_module("kure_jax.qat_ops", "kure_jax.quant.quantizers")
