"""How a tensor and its per-tensor/per-channel scale are laid out for the 2-D kernels.

A kernel sees ``x`` as a row-major matrix ``(rows, cols)`` (a free reshape, no copy) and its scale
as one of three groupings, named by which elements share a step:

* ``"tensor"``: one step; the matrix shape is chosen for good blocks (``cols`` a multiple of 128
  when the size allows it).
* ``"col"``: one step per column: the channel axes are the trailing axes of ``x`` (HWIO conv and
  ``(in, out)`` dense kernels with ``axis=-1``, NHWC activations per channel).
* ``"row"``: one step per row: the channel axes are the leading axes (e.g. ``axis=0``).

Channel axes in the middle of ``x`` have no copy-free matrix view and use the jnp path.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from kure_jax.kernels._config import Launch

_TENSOR_COLS = (1024, 512, 256, 128)
# Elements per program on GPU: large enough to hide memory latency with 4 warps, small enough to
# stay in registers. benchmarks/fake_quant_throughput.py sweeps this on the device.
GPU_BLOCK_ELEMENTS = 2048
GPU_COL_MODE_COLS = 64
TPU_MAX_BLOCK = (512, 1024)


class View(NamedTuple):
    """A ``(rows, cols)`` matrix view of a tensor and how its scale is grouped."""

    rows: int
    cols: int
    mode: str  # "tensor", "col" or "row"

    @property
    def scale_shape(self) -> tuple[int, int]:
        """Shape of the scale in this view: ``(1, 1)``, ``(1, cols)`` or ``(rows, 1)``."""
        return {"tensor": (1, 1), "col": (1, self.cols), "row": (self.rows, 1)}[self.mode]


def view_for_kept_axes(shape: tuple[int, ...], kept: tuple[int, ...]) -> View | None:
    """The matrix view for a scale that varies along the (non-negative) axes ``kept``.

    Returns ``None`` when the channel axes are neither all leading nor all trailing (axes of
    size 1 may be either).
    """
    size = math.prod(shape)
    kept_set = {a for a in kept if shape[a] != 1}
    if not kept_set:
        if size % 128 == 0:
            cols = next(c for c in _TENSOR_COLS if size % c == 0)
            return View(size // cols, cols, "tensor")
        cols = shape[-1] if shape else 1
        return View(size // max(cols, 1), cols, "tensor")
    first, last = min(kept_set), max(kept_set)
    if all(a in kept_set for a in range(first, len(shape)) if shape[a] != 1):
        cols = math.prod(shape[first:])
        return View(size // cols, cols, "col")
    if all(a in kept_set for a in range(last + 1) if shape[a] != 1):
        rows = math.prod(shape[: last + 1])
        return View(rows, size // rows, "row")
    return None


def view_for_scale(shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> View | None:
    """``view_for_kept_axes`` for a scale of ``scale_shape`` broadcast against ``shape``."""
    aligned = (1,) * (len(shape) - len(scale_shape)) + tuple(scale_shape)
    return view_for_kept_axes(shape, tuple(i for i, d in enumerate(aligned) if d != 1))


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def default_block(view: View, launch: Launch) -> tuple[int, int]:
    """A ``(block_rows, block_cols)`` that satisfies the platform's rules for ``view``."""
    if launch.platform == "gpu":
        # Per-column steps reduce along rows: narrow tiles keep the per-tile partial sums (one
        # row of bc per tile) at <= 1/32 of the tensor.
        widest = GPU_COL_MODE_COLS if view.mode == "col" else GPU_BLOCK_ELEMENTS
        bc = min(_next_pow2(view.cols), widest)
        return min(_next_pow2(view.rows), max(1, GPU_BLOCK_ELEMENTS // bc)), bc
    max_r, max_c = TPU_MAX_BLOCK
    return (view.rows if view.rows <= max_r else max_r), (view.cols if view.cols <= max_c
                                                           else max_c)


def check_block(block: tuple[int, int], view: View, launch: Launch) -> tuple[int, int]:
    """Validates a user ``block_shape`` for ``view`` on ``launch.platform``.

    Raises:
      ValueError: if ``block`` is not two positive ints, or (GPU) not powers of two, or (TPU) a
        dimension is neither the full extent nor a multiple of 8 (rows) / 128 (cols).
    """
    ok = (
        isinstance(block, tuple | list)
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    )
    if not ok:
        raise ValueError(f"block_shape must be a pair of positive ints; got {block!r}.")
    br, bc = block
    if launch.platform == "gpu" and (br & (br - 1) or bc & (bc - 1)):
        raise ValueError(f"block_shape on GPU (Triton) must be powers of two; got {block!r}.")
    if launch.platform == "tpu" and not (
        (br == view.rows or br % 8 == 0) and (bc == view.cols or bc % 128 == 0)
    ):
        raise ValueError(
            f"block_shape on TPU must have rows = {view.rows} or a multiple of 8 and cols = "
            f"{view.cols} or a multiple of 128; got {block!r}."
        )
    return int(br), int(bc)
