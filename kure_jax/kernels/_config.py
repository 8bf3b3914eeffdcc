"""Choosing between the Pallas kernels and the jnp path, and how a kernel is launched.

Two independent choices, both static (Python values, resolved while tracing):

* ``impl``: ``"pallas"`` (the kernel), ``"jnp"`` (plain ``jax.numpy``, which XLA fuses) or
  ``"auto"``. ``None`` reads the ``KURE_JAX_KERNELS`` environment variable (same values) and falls
  back to ``"auto"``. ``"auto"`` takes the kernel only on the backends in
  ``AUTO_PALLAS_BACKENDS`` (see its comment), so CPU users and CI never depend on Pallas.
* ``platform``: which kernel variant to build, ``"gpu"`` (Triton: power-of-two blocks, explicit
  load/store masks at the edges) or ``"tpu"`` (Mosaic: ``(8, 128)``-aligned blocks, edge blocks
  padded and their writes dropped by Pallas). ``None`` takes ``jax.default_backend()``, and
  ``"gpu"`` on CPU. Naming a platform other than the local one is how a kernel is lowered for
  export (``jax.export(..., platforms=["cuda"])``) from a CPU host.

``interpret=True`` runs the chosen variant in the Pallas interpreter (any backend, slow; this is
how the tests check the kernels on CPU). ``None`` interprets exactly when the local backend is
neither GPU nor TPU.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp

IMPLS: tuple[str, ...] = ("auto", "pallas", "jnp")
PLATFORMS: tuple[str, ...] = ("gpu", "tpu")
ENV_VAR = "KURE_JAX_KERNELS"
# "auto" uses the kernels on GPU only, and there only where they measured faster than XLA (the
# penalty; fake-quant per ``auto_takes_fake_quant``): BENCHMARKS.md, "Dispatch decision". The
# Mosaic (TPU) variant is lowered in CI but has never run on a TPU, so TPU stays on the jnp path
# until it has.
AUTO_PALLAS_BACKENDS: frozenset[str] = frozenset({"gpu"})


class Launch(NamedTuple):
    """Static launch settings of one kernel call (hashable, so usable as a jit static arg)."""

    platform: str  # "gpu" or "tpu": the kernel variant.
    interpret: bool  # Run in the Pallas interpreter.

    @property
    def masked_io(self) -> bool:
        """Whether loads/stores carry explicit edge masks (Triton reads out of bounds otherwise)."""
        return self.platform == "gpu"


def local_backend() -> str:
    """``"cpu"``, ``"gpu"`` or ``"tpu"`` for ``jax.default_backend()`` (CUDA/ROCm are "gpu")."""
    backend = jax.default_backend()
    return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def resolve_impl(impl: str | None) -> tuple[str, bool]:
    """Resolves an ``impl`` argument (see the module docstring).

    Returns:
      ``(choice, strict)``: ``choice`` is ``"pallas"`` or ``"jnp"``; ``strict`` is True when the
      kernel was asked for by name, so that an input it cannot handle is an error rather than a
      silent fallback to the jnp path.

    Raises:
      ValueError: if ``impl`` (or the environment variable, when ``impl`` is ``None``) is not one
        of ``IMPLS``.
    """
    source = "impl"
    if impl is None:
        impl, source = os.environ.get(ENV_VAR, "") or "auto", f"${ENV_VAR}"
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"{source} must be one of {IMPLS} (or None for impl); got {impl!r}.")
    if impl == "auto":
        return ("pallas" if local_backend() in AUTO_PALLAS_BACKENDS else "jnp"), False
    return impl, impl == "pallas"


def auto_takes_fake_quant(dtype: jax.typing.DTypeLike, rounding: str) -> bool:
    """Whether ``impl="auto"`` (on a backend in ``AUTO_PALLAS_BACKENDS``) runs a fake-quant kernel.

    True for 16-bit inputs with deterministic rounding, where the kernels measured faster than
    XLA's fusions; float32 and stochastic rounding stay on the jnp path (BENCHMARKS.md,
    "Dispatch decision").
    """
    return jnp.dtype(dtype).itemsize == 2 and rounding != "stochastic"


def launch(platform: str | None, interpret: bool | None) -> Launch:
    """Resolves ``platform`` and ``interpret`` (see the module docstring) into a ``Launch``.

    Raises:
      ValueError: if ``platform`` is not ``None`` or one of ``PLATFORMS``, or ``interpret`` is
        not ``None`` or a bool.
    """
    local = local_backend()
    if platform is None:
        platform = local if local in PLATFORMS else "gpu"
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be None or one of {PLATFORMS}; got {platform!r}.")
    if interpret is None:
        interpret = local not in PLATFORMS
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret must be None, True or False; got {interpret!r}.")
    return Launch(platform, interpret)


def compiler_params(launch_: Launch, grid_ndim: int, *, num_warps: int = 4, parallel: bool = True):
    """Backend compiler parameters of a ``pallas_call`` (``None`` in interpret mode).

    ``parallel=False`` keeps a TPU grid sequential on one core, for kernels whose programs rely
    on the pipeline visiting blocks in order.

    On GPU, passing Triton parameters is also what selects the Triton lowering: without them
    recent JAX versions lower ``pallas_call`` with Mosaic GPU, whose layout rules these kernels
    do not follow.
    """
    if launch_.interpret:
        return None
    if launch_.platform == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=num_warps, num_stages=1)
    from jax.experimental.pallas import tpu as pltpu

    semantics = "parallel" if parallel else "arbitrary"
    return pltpu.CompilerParams(dimension_semantics=(semantics,) * grid_ndim)
