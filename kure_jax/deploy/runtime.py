"""What every runtime backend shares: the result record, optional imports, batching, accuracy.

A backend's ``evaluate(...)`` never raises for a conversion or quantisation that the toolchain
refuses: it returns a :class:`RuntimeResult` with ``accuracy=None`` and the reason, so a sweep
over many schemes reports the refusals next to the numbers. A missing package is different (the
whole backend is unusable): :func:`require` raises one ``ImportError`` naming the pip package.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import jax
import numpy as np

__all__ = ["ApplyFn", "RuntimeResult", "accuracy", "batches", "linen_inference", "require"]

ApplyFn = Callable[[jax.Array], jax.Array]
"""``images (B, H, W, C) float32 -> logits (B, classes)``, a pure function in inference mode."""


@dataclasses.dataclass(frozen=True)
class RuntimeResult:
    """The outcome of one runtime and scheme.

    Attributes:
      runtime: ``"litert"`` or ``"onnxruntime"``.
      scheme: a short label of the scheme, e.g. ``"int8 per-channel minmax"``.
      accuracy: top-1 accuracy in [0, 1], or ``None`` if the toolchain refused.
      error: why it failed (one line, the toolchain's message), ``None`` on success.
      model_bytes: size of the serialised model that was run (``None`` on failure).
      logits: the runtime's float32 logits ``(N, classes)`` on the eval images (success only).
    """

    runtime: str
    scheme: str
    accuracy: float | None
    error: str | None = None
    model_bytes: int | None = None
    logits: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """True if the scheme converted and ran."""
        return self.error is None

    def row(self) -> dict[str, Any]:
        """A flat dict for tables/CSV (no logits)."""
        return {"runtime": self.runtime, "scheme": self.scheme, "accuracy": self.accuracy,
                "error": self.error, "model_bytes": self.model_bytes}


def failure(runtime: str, scheme: str, err: BaseException) -> RuntimeResult:
    """A failed :class:`RuntimeResult` whose reason is the first line of ``err``."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return RuntimeResult(runtime, scheme, None, error=f"{type(err).__name__}: "
                         f"{lines[0] if lines else 'no message'}")


def require(module: str, pip_name: str) -> ModuleType:
    """Imports an optional runtime dependency.

    Args:
      module: the import name (``"ai_edge_litert.interpreter"``).
      pip_name: the package to install (``"ai-edge-litert"``).

    Returns:
      The module.

    Raises:
      ImportError: naming ``pip_name`` (and the ``runtimes`` extra) if it cannot be imported.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"this runtime backend needs the '{pip_name}' package: pip install {pip_name} "
            f"(or pip install 'kure_jax[runtimes]'); importing {module} failed: {err}"
        ) from err


def batches(images: np.ndarray, batch_size: int, *, pad: bool = False) -> Iterator[np.ndarray]:
    """Consecutive ``batch_size`` slices of ``images`` (float32); with ``pad`` the last one is
    padded with zero images to the full size (for fixed-shape models).

    Raises:
      ValueError: if ``batch_size < 1`` or ``images`` is empty.
    """
    images = np.asarray(images, np.float32)
    if batch_size < 1 or images.shape[0] == 0:
        raise ValueError(f"need batch_size >= 1 and images; got {batch_size}, {images.shape}.")
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start:start + batch_size]
        if pad and chunk.shape[0] < batch_size:
            filler = np.zeros((batch_size - chunk.shape[0], *chunk.shape[1:]), np.float32)
            chunk = np.concatenate([chunk, filler])
        yield chunk


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``logits (N, classes)`` against int ``labels (N,)``.

    Raises:
      ValueError: if the numbers of rows differ.
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} logits rows for {labels.shape[0]} labels.")
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def linen_inference(model: Any, variables: Any, **kwargs: Any) -> ApplyFn:
    """``images -> model.apply(variables, images, train=False, **kwargs)``, the inference-mode
    function every backend takes (BatchNorm uses its running statistics).

    Args:
      model: a Flax Linen module whose ``__call__`` takes ``train`` (all of kure_jax.models).
      variables: ``{"params", "batch_stats"}``.
      **kwargs: further keyword arguments of ``__call__``.
    """
    return lambda images: model.apply(variables, images, train=False, **kwargs)
