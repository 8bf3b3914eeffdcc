"""Evaluation building blocks: quantised forward passes and their accuracy over a test split.

Every evaluation step here returns one float32 row ``[correct, loss, mask]`` per example
(zeros on the padding of the last batch, ``mask == 0``), and the host adds the rows up in
float64, sequentially in the order of the examples: the accuracy is exactly the one
``kure_jax.training.train_and_evaluate`` reports, and accuracy and loss do not depend on how
many devices or processes shared the batch (see :mod:`kure_jax.evaluation.parallel`: pass an
``EvalMesh`` as ``mesh`` to shard the batch over its devices).

Continuous sweeps (step ratios, stochastic-rounding keys) are *mapped*: one ``jax.jit``-compiled
function evaluates all points on a batch with ``jax.lax.map(..., batch_size=chunk)``, so a
61-point sweep is one compilation and one dispatch per batch instead of 61 of each. The clip
statistics of the weights (max, MSE search, ...) do not depend on the mapped value, so within a
vmapped chunk they are computed once (and XLA may hoist them out of the ``lax.map`` loop).

On CPU a vmapped conv whose kernel differs per point lowers to a grouped convolution, which is
several times slower than ``chunk=1``; on accelerators larger chunks can pay off.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kure_jax import QATConfig, QuantPolicy, quantize_params, quantized_apply
from kure_jax.evaluation.parallel import EvalMesh
from kure_jax.selection import LeafPredicate

__all__ = [
    "Metrics",
    "batch_rows",
    "batch_sums",
    "check_apply",
    "classifier_apply",
    "evaluate",
    "evaluate_mapped",
    "inference_kwargs",
    "logits_metrics",
    "make_eval_step",
    "mapped_eval_step",
    "metrics_from_sums",
    "ptq_transform",
]

PyTree = Any
Batch = Mapping[str, np.ndarray]
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]


class Metrics(NamedTuple):
    """Accuracy (fraction in [0, 1]), mean cross-entropy and number of test images.

    What :func:`evaluate` and :func:`evaluate_mapped` return: the one ``Metrics`` of kure_jax
    (a training step's metrics are plain dicts of arrays).
    """

    accuracy: float
    loss: float
    count: int


def inference_kwargs(model: nn.Module) -> dict[str, bool]:
    """``{"train": False}`` if ``model.__call__`` takes a ``train`` argument, else ``{}``: how
    a Linen classifier is called in inference mode (kure_jax.models take ``train``)."""
    return {"train": False} if "train" in inspect.signature(model.__call__).parameters else {}


def classifier_apply(model: nn.Module, *, qat: QATConfig | None = None) -> ApplyFn:
    """``apply(variables, images) -> logits`` of a classifier in inference mode.

    Args:
      model: a Flax Linen classifier, called as ``model(images, train=False)`` if its
        ``__call__`` takes ``train`` (see :func:`inference_kwargs`), else ``model(images)``.
      qat: a :class:`kure_jax.QATConfig` to run the model fake-quantised as trained
        (``variables`` then holds its ``"quant"`` collection), or ``None`` for float.

    Returns:
      A pure function of ``(variables, images (B, H, W, C))`` returning float32 logits
      ``(B, num_classes)``; not jitted (callers compose and jit it).
    """
    kwargs = inference_kwargs(model)
    if qat is None or not qat.quantizes:
        return lambda variables, images: model.apply(variables, images, **kwargs)
    return lambda variables, images: quantized_apply(model, variables, images, qat=qat, **kwargs)


def check_apply(
    apply_fn: ApplyFn,
    variables: PyTree,
    image_shape: Sequence[int],
    *,
    num_classes: int | None = None,
) -> tuple[int, ...]:
    """Checks, by tracing only, that ``apply_fn(variables, images)`` takes images of
    ``image_shape`` and returns logits ``(B, C)``.

    Args:
      apply_fn: ``(variables, images) -> logits``.
      variables: arrays or ``jax.ShapeDtypeStruct`` leaves.
      image_shape: one image's shape, e.g. ``(28, 28, 1)``; traced as float32 ``(2, ...)``.
      num_classes: the ``C`` the logits must have, or ``None`` (any).

    Returns:
      The logits' shape for a batch of 2.

    Raises:
      ValueError: naming the image and logits shapes, if tracing fails (the model rejects
        the images) or the logits are not ``(2, num_classes)``.
    """
    images = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
    try:
        logits = jax.eval_shape(apply_fn, variables, images)
    except Exception as err:  # any error of the user's model while tracing
        first = (str(err).strip().splitlines() or [""])[0][:240]
        raise ValueError(f"the model rejects images of shape {images.shape} "
                         f"(image shape {tuple(image_shape)}): {type(err).__name__}: {first}"
                         ) from err
    shape = tuple(getattr(logits, "shape", ()))
    if len(shape) != 2 or shape[0] != 2 or (num_classes is not None and shape[1] != num_classes):
        want = f"(2, {num_classes})" if num_classes is not None else "(2, num_classes)"
        raise ValueError(f"the model maps images of shape {images.shape} to outputs of shape "
                         f"{shape if isinstance(logits, jax.ShapeDtypeStruct) else logits!r}; "
                         f"expected logits {want}.")
    return shape


def batch_rows(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """``[correct, loss, mask]`` of every example, zeros where ``mask == 0``.

    Args:
      logits: float ``(B, C)``.
      labels: int ``(B,)``.
      mask: float ``(B,)`` of 0/1.

    Returns:
      float32 ``(B, 3)``: 1.0 if the argmax is the label, the softmax cross-entropy, the mask
      (a padding row is all zeros, even if its loss is not finite).
    """
    logits = logits.astype(jnp.float32)
    valid = mask.astype(jnp.float32) > 0
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    rows = jnp.stack([correct, ce, jnp.ones_like(ce)], axis=-1)
    return jnp.where(valid[:, None], rows, 0.0)


def batch_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """``[correct, loss_sum, count]`` over the rows with ``mask == 1`` (float32 ``(3,)``;
    shapes as :func:`batch_rows`)."""
    return jnp.sum(batch_rows(logits, labels, mask), axis=0)


def metrics_from_sums(sums: np.ndarray) -> Metrics:
    """``Metrics`` from summed ``[correct, loss_sum, count]`` (shape ``(3,)``)."""
    correct, loss_sum, count = (float(v) for v in sums)
    if count <= 0:
        raise ValueError("the evaluation split yielded no unmasked example.")
    return Metrics(accuracy=correct / count, loss=loss_sum / count, count=round(count))


def _add_rows(total: np.ndarray | None, rows: jax.Array) -> np.ndarray:
    """``total + rows.sum(-2)`` in float64, adding the ``(..., B, 3)`` rows one after another
    in example order (``np.cumsum`` is sequential): the result does not depend on where
    batches start, on padding (zero rows) or on the device count."""
    rows = np.asarray(rows, np.float64)
    if total is not None:
        rows = np.concatenate([total[..., None, :], rows], axis=-2)
    return np.cumsum(rows, axis=-2)[..., -1, :]


def _run(step: Callable[..., jax.Array], args: tuple, batches: Iterable[Batch],
         mesh: EvalMesh | None) -> np.ndarray:
    """Sums the ``(..., B, 3)`` rows of ``step`` over ``batches``: float64 ``(..., 3)``."""
    total = None
    for batch in batches:
        placed = batch if mesh is None else mesh.place_batch(batch)
        total = _add_rows(total, step(*args, placed["image"], placed["label"], placed["mask"]))
    if total is None:
        raise ValueError("the evaluation split yielded no batch.")
    return total


def logits_metrics(logits: np.ndarray, labels: np.ndarray) -> Metrics:
    """:class:`Metrics` of logits computed elsewhere (e.g. by a real runtime), reduced as
    every point of a sweep is (:func:`batch_rows`, float64 sum in example order).

    Args:
      logits: float ``(N, C)``.
      labels: int ``(N,)``.

    Raises:
      ValueError: if ``N == 0``.
    """
    rows = batch_rows(jnp.asarray(logits), jnp.asarray(labels), jnp.ones(len(labels)))
    return metrics_from_sums(_add_rows(None, rows))


def make_eval_step(apply_fn: ApplyFn, *, mesh: EvalMesh | None = None) -> Callable[..., jax.Array]:
    """``jit(step(variables, images, labels, mask) -> rows)``: the ``(B, 3)`` rows of
    :func:`batch_rows`.

    Build it once per model and reuse it: new ``variables`` values (e.g. other quantised
    weights) of the same shapes run the same compiled program.

    Args:
      apply_fn: ``(variables, images) -> logits``.
      mesh: with an :class:`~kure_jax.evaluation.parallel.EvalMesh`, every device runs
        ``apply_fn`` on its rows (in calls of ``mesh.micro_batch`` rows, if set) and the rows
        come back replicated: every process reads the whole global batch's rows.
    """
    if mesh is None:
        return jax.jit(lambda variables, images, labels, mask: batch_rows(
            apply_fn(variables, images), labels, mask))
    local_apply = mesh.micro_batched(apply_fn)
    return mesh.per_device(lambda variables, images, labels, mask: batch_rows(
        local_apply(variables, images), labels, mask), replicated=1, batched=3)


def evaluate(
    step: Callable[..., jax.Array],
    variables: PyTree,
    batches: Iterable[Batch],
    *,
    mesh: EvalMesh | None = None,
) -> Metrics:
    """Accuracy and loss of a step from :func:`make_eval_step` over ``batches``.

    Args:
      step: ``step(variables, images, labels, mask) -> (B, 3)`` rows.
      variables: the model variables (replicated on ``mesh``'s devices when it is given).
      batches: dicts with ``image`` (B, H, W, C), ``label`` (B,) int and ``mask`` (B,);
        with ``mesh``, this process's share of each global batch.
      mesh: shard each batch over its devices (:meth:`EvalMesh.place_batch`).

    Returns:
      :class:`Metrics` over the unmasked rows.

    Raises:
      ValueError: if ``batches`` is empty or fully masked.
    """
    return metrics_from_sums(_run(step, (variables,), batches, mesh))


def mapped_eval_step(
    apply_fn: ApplyFn,
    transform: Callable[[PyTree, jax.Array], PyTree],
    *,
    chunk: int = 1,
    mesh: EvalMesh | None = None,
) -> Callable[..., jax.Array]:
    """A jitted step that evaluates many variants of the variables in one program.

    ``step(variables, xs, images, labels, mask)`` returns float32 ``(P, B, 3)`` rows, ``[p]``
    those of ``apply_fn(transform(variables, xs[p]), images)``; ``xs`` has a leading axis
    ``P`` (e.g. step ratios, or typed PRNG keys).

    Args:
      apply_fn: ``(variables, images) -> logits``.
      transform: ``(variables, x) -> variables``, e.g. weight PTQ at step ratio ``x``.
      chunk: points evaluated together by ``vmap`` inside the compiled ``lax.map`` loop
        (``1``: a compiled loop, one point at a time).
      mesh: as in :func:`make_eval_step`.

    Raises:
      ValueError: if ``chunk < 1``.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}.")

    local_apply = apply_fn if mesh is None else mesh.micro_batched(apply_fn)

    def step(variables, xs, images, labels, mask):
        def point(x):
            return batch_rows(local_apply(transform(variables, x), images), labels, mask)

        return jax.lax.map(point, xs, batch_size=chunk)

    if mesh is None:
        return jax.jit(step)
    return mesh.per_device(step, replicated=2, batched=3, batch_axis=1)


def ptq_transform(
    policy: QuantPolicy | str | Any, *, where: LeafPredicate | None, over: str | None = None
) -> Callable[..., PyTree]:
    """``transform(variables[, x])``: ``variables`` with ``quantize_params`` applied to
    ``variables["params"]``.

    Args:
      policy: the weight quantizer: a ``QuantPolicy``, or a data type of
        :mod:`kure_jax.quant.formats` (a ``Format`` or a preset name such as ``"mxfp4"``).
      where: the leaf selection of ``quantize_params``.
      over: ``None`` (``transform(variables)``; a stochastic policy then uses
        ``jax.random.key(0)``), ``"step_ratio"`` (``x`` scales every step) or ``"key"``
        (``x`` is the rounding key).

    Raises:
      ValueError: for another ``over``, or ``over="step_ratio"`` with stochastic rounding.
    """
    if over not in (None, "step_ratio", "key"):
        raise ValueError(f"over must be None, 'step_ratio' or 'key'; got {over!r}.")
    stochastic = getattr(policy, "rounding", None) == "stochastic"
    if over == "step_ratio" and stochastic:
        raise ValueError("a step-ratio sweep needs a deterministic rounding; got 'stochastic'.")

    def transform(variables: PyTree, x: Any = None) -> PyTree:
        if over == "step_ratio":
            kwargs = {"step_ratio": x}
        elif over == "key":
            kwargs = {"key": x}
        else:
            kwargs = {"key": jax.random.key(0)} if stochastic else {}
        params = quantize_params(variables["params"], policy, where=where, **kwargs)
        return {**variables, "params": params}

    return transform


def evaluate_mapped(
    step: Callable[..., jax.Array],
    variables: PyTree,
    xs: jax.Array,
    batches: Iterable[Batch],
    *,
    mesh: EvalMesh | None = None,
) -> list[Metrics]:
    """Runs a mapped step (see :func:`mapped_eval_step`) over ``batches`` (``mesh`` as in
    :func:`evaluate`).

    Returns:
      One :class:`Metrics` per entry of ``xs``, in order.
    """
    total = _run(step, (variables, xs), batches, mesh)
    return [metrics_from_sums(row) for row in total]
